"""Shared-key strength and the key fingerprint.

Why a minimum strength. Each side of a handshake proves it holds the key
with an HMAC over both nonces and both identities (connection.py), and the
accepting side sends its proof before it has checked anything: a stranger
who connects, or an impostor who is dialled, gets one proof over a nonce of
its choosing. HMAC-SHA256 is a pseudo-random function, so that proof tells
the stranger nothing about the key except a way to check a guess offline:
the work to find the key is one HMAC per guess, over every key the owner
could have picked. The first proof therefore leaks no more than the key's
own strength, and with at least 128 bits of key material no amount of
guessing is enough. Below that (``b"shared secret"``, ``hunter2``) a
dictionary recovers the key in seconds, which is why weak keys are refused
wherever a stranger can reach the broker, and only warned about on loopback.

Why the fingerprint reveals nothing. ``/metrics`` publishes a fingerprint so
the operator can see which key a worker presents. Any function of the key
alone lets a guess be checked offline, so only strong keys get a digest: an
HMAC keyed with the key itself (128 bits of it), which for a 128-bit key is
as hard to invert as the handshake. A weak key is published as
``WEAK_KEY_FINGERPRINT``, the same for every weak key: nothing to test
guesses against.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import string
from collections.abc import Iterable
from typing import Final

from patio.errors import WeakKeyError

#: Least key material accepted off loopback: beyond any offline guessing.
MIN_KEY_BITS: Final = 128

#: What a weak key's fingerprint is: the same for all of them.
WEAK_KEY_FINGERPRINT: Final = "weak-key"

_FINGERPRINT_CONTEXT: Final = b"patio-key-fingerprint-v2"
#: Hex digits of the fingerprint: 128 bits, no collisions in practice.
_FINGERPRINT_HEX_DIGITS: Final = 32

_CLASSES: Final = (
    (frozenset(string.digits.encode()), 10),
    (frozenset(string.ascii_lowercase.encode()), 26),
    (frozenset(string.ascii_uppercase.encode()), 26),
    (frozenset(string.punctuation.encode() + b" "), 33),
)

HOW_TO_MAKE_A_KEY: Final = (
    "make a strong key with `patio keygen` (32 random bytes, printable) and pass it as "
    "key= or with --key-file"
)


def estimated_bits(key: bytes) -> float:
    """An upper bound on the key's strength from its length and character kinds.

    Each byte counts for the size of the alphabet its kinds span (digits 10,
    lowercase 26, uppercase 26, punctuation and space 33; any other byte
    makes it a binary key, 256). It cannot see that a long key is made of
    dictionary words; it does see every short or narrow one.
    """
    if not key:
        return 0.0
    present = set(key)
    alphabet = 0
    for members, size in _CLASSES:
        if present & members:
            alphabet += size
            present -= members
    if present:  # bytes outside printable ASCII: a binary key
        alphabet = 256
    return len(key) * math.log2(alphabet)


def is_weak(key: bytes) -> bool:
    """True for a non-empty key with less than ``MIN_KEY_BITS`` estimated bits."""
    return bool(key) and estimated_bits(key) < MIN_KEY_BITS


def fingerprint(key: bytes) -> str:
    """A name for ``key`` that is safe to publish (see the module docstring)."""
    if is_weak(key):
        return WEAK_KEY_FINGERPRINT
    digest = hmac.new(key, _FINGERPRINT_CONTEXT, hashlib.sha256).hexdigest()
    return digest[:_FINGERPRINT_HEX_DIGITS]


def check_strength(keys: Iterable[bytes], where: str, *, loopback: bool, allow_weak: bool) -> str:
    """Refuse weak keys off loopback; return a warning to log ('' if none).

    ``where`` names the address for messages (``listening on 10.0.0.5``).
    On loopback, and with ``allow_weak`` anywhere, a weak key is allowed with
    a warning: only local processes (or a network the owner trusts) can
    collect a proof to guess against.
    """
    weak = [key for key in keys if is_weak(key)]
    if not weak:
        return ""
    bits = min(estimated_bits(key) for key in weak)
    if loopback or allow_weak:
        reason = "loopback" if loopback else "allowed explicitly"
        return (
            f"weak patio key ({bits:.0f} of {MIN_KEY_BITS} bits) {where} ({reason}): "
            f"anyone who can connect can guess it offline; {HOW_TO_MAKE_A_KEY}"
        )
    raise WeakKeyError(
        f"refusing a weak key {where}: about {bits:.0f} bits, at least {MIN_KEY_BITS} are "
        f"needed, because anyone who connects can test guesses of a weak key offline; "
        f"{HOW_TO_MAKE_A_KEY} (or pass allow_weak_key=True / --allow-weak-key if this "
        "network is trusted)"
    )
