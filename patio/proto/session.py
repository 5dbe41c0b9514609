"""Session keys from the handshake, and the MAC every frame after it carries.

Why. The handshake proves each side holds an accepted key, but on its own
it says nothing about the frames that follow: a relay that passes the
handshake through untouched could then inject, change, replay, drop or
reflect frames (issue 16 item 2). So each direction gets its own key,
derived from everything the handshake agreed on, and every byte after the
handshake is covered by a tag over it and its place in the stream.

Key derivation (HKDF-SHA256, RFC 5869, written out below: it is two HMACs):

- input key material: the dialer's key and the acceptor's key (during a
  rotation the two sides may prove themselves with different keys; each
  side knows both once it has verified the peer's proof), length-prefixed;
- salt: both nonces, the dialer's first;
- info: the transcript (``transcript``), i.e. the protocol version, whether
  frames carry a MAC, both identities (node id and instance) with their
  roles, both nonces and the TLS channel binding, then the direction.

The same transcript is what each side's HELLO proof covers, so a version,
flag or binding changed on the way fails the handshake before any key is
used.

Records. After the handshake frames travel in records, ``length | frames |
tag``, where ``length`` counts the frames and the tag, and the tag is
HMAC-SHA256, truncated to 128 bits, over ``sequence (8 bytes) | length (4
bytes) | frames`` under the key of the sender's direction. What one write carries is one record
(frames share a record up to 64 KiB; a larger frame has its own), so the
MAC costs one tag per write, not per frame: at 64 calls in flight a write
carries about 60 frames, and a tag per frame cost 26% more instructions per
call where a tag per record costs 1 to 3% (docs/protocol.md). The sequence
number counts the records each side sent since the handshake, from 0; it is
never sent, each side counts it, so a record replayed, dropped, reordered
or reflected back at its sender is checked against the wrong number (or the
wrong key) and fails.

HMAC-SHA256 rather than keyed BLAKE2b: OpenSSL's SHA-256 uses the CPU's
SHA instructions, CPython's BLAKE2b is portable C. Per call, in CPU time,
both cost the same for small calls and HMAC-SHA256 a third less for 64 KiB
arguments (docs/protocol.md has the figures).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

import msgpack

#: Bytes of tag at the end of every authenticated frame.
TAG_SIZE: Final = 16
_KEY_SIZE: Final = 32
_KDF_CONTEXT: Final = b"patio-session-v2"
_DIALER_TO_ACCEPTOR: Final = b"dialer->acceptor"
_ACCEPTOR_TO_DIALER: Final = b"acceptor->dialer"
_PLACE: Final = struct.Struct(">QI")


def transcript(
    version: int,
    frame_mac: bool,
    dialer: tuple[str, str],
    acceptor: tuple[str, str],
    dialer_nonce: bytes,
    acceptor_nonce: bytes,
    channel_binding: bytes,
) -> bytes:
    """What both sides agreed on, in one encoding (roles fixed by position)."""
    packed: bytes = msgpack.packb(
        [version, frame_mac, list(dialer), list(acceptor), dialer_nonce, acceptor_nonce,
         channel_binding],
        use_bin_type=True,
    )  # fmt: skip
    return packed


def hkdf_extract(salt: bytes, material: bytes) -> bytes:
    return hmac.digest(salt, material, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int = _KEY_SIZE) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def session_keys(
    dialer_key: bytes,
    acceptor_key: bytes,
    dialer_nonce: bytes,
    acceptor_nonce: bytes,
    agreed: bytes,
) -> tuple[bytes, bytes]:
    """(dialer->acceptor key, acceptor->dialer key) for one link.

    ``agreed`` is :func:`transcript`. Keys are length-prefixed so that no two
    different pairs give the same material.
    """
    material = (
        len(dialer_key).to_bytes(4, "big") + dialer_key
        + len(acceptor_key).to_bytes(4, "big") + acceptor_key
    )  # fmt: skip
    prk = hkdf_extract(dialer_nonce + acceptor_nonce, material)
    info = _KDF_CONTEXT + agreed
    return (
        hkdf_expand(prk, info + _DIALER_TO_ACCEPTOR),
        hkdf_expand(prk, info + _ACCEPTOR_TO_DIALER),
    )


_INNER_PAD: Final = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD: Final = bytes(byte ^ 0x5C for byte in range(256))
_SHA256_BLOCK: Final = 64


class FrameMac:
    """Tags one direction's records in order: the sequence number is counted here.

    HMAC-SHA256 (RFC 2104) from its two padded-key states, hashed once per
    link and copied per record: ``hmac.new`` would hash the key again for
    every record, which doubles the cost of a small one.
    """

    __slots__ = ("_inner", "_outer", "sequence")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(padded.translate(_INNER_PAD))
        self._outer = hashlib.sha256(padded.translate(_OUTER_PAD))
        self.sequence = 0

    def tag(self, length: int, body: bytes | bytearray | memoryview) -> bytes:
        """The tag of the next record (``length`` is its header's value); counts it."""
        inner = self._inner.copy()
        inner.update(_PLACE.pack(self.sequence, length))
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        self.sequence += 1
        return outer.digest()[:TAG_SIZE]
