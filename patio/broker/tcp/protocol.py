"""patio 0.1.4's packet protocol objects, kept importable for code written against it.

Our wire protocol lives in :mod:`patio.proto`; these classes are not used on
the wire. What they keep is 0.1.4's meaning: :class:`Protocol` numbers calls
with a serial that wraps back to 1 at ``MAX_SERIAL`` (a TCP broker's
``protocol.serial`` is the call counter of that broker, exactly as in 0.1.4),
packs payloads behind a 9-byte header and digests data with the shared key.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from patio.broker.serializer import AbstractSerializer


@enum.unique
class PacketTypes(enum.IntEnum):
    """The packet kinds of patio 0.1.4, with their wire values."""

    AUTH_DIGEST = 0
    AUTH_REQUEST = 1
    AUTH_RESPONSE = 2
    AUTH_OK = 3
    DISCOVER_REQUEST = 5
    DISCOVER_RESPONSE = 6
    REQUEST = 10
    RESPONSE = 20
    ERROR = 30


_HEADER: Final = struct.Struct("!bII")  # type, payload size, serial; network byte order


@dataclass
class Header:
    """The header in front of every 0.1.4 packet."""

    STRUCT: ClassVar[struct.Struct] = _HEADER
    SIZE: ClassVar[int] = _HEADER.size

    type: PacketTypes
    size: int
    serial: int

    def pack(self) -> bytes:
        return _HEADER.pack(int(self.type), self.size, self.serial)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        kind, size, serial = _HEADER.unpack(data)
        return cls(PacketTypes(kind), size, serial)


class Protocol:
    """Serial numbers, packing and keyed digests, as patio 0.1.4 defines them."""

    HEADER_STRUCT: ClassVar[struct.Struct] = _HEADER
    #: The largest serial; the next one after reaching it is 1 again.
    MAX_SERIAL: ClassVar[int] = 2**32 - 1

    __slots__ = ("__key", "lock", "serial", "serializer")

    def __init__(self, *, serializer: AbstractSerializer, key: bytes = b"") -> None:
        self.__key = key
        self.serial = 0
        self.lock = threading.Lock()
        self.serializer = serializer

    def get_serial(self) -> int:
        """The next serial (thread-safe): 1, 2, ... ``MAX_SERIAL - 1``, then 1 again."""
        with self.lock:
            serial = self.serial + 1
            if serial >= self.MAX_SERIAL:
                serial = 1
            self.serial = serial
            return serial

    def digest(self, data: bytes, *, salt: bytes | None = None) -> tuple[bytes, bytes]:
        """``(salt, keyed BLAKE2s digest of data)``; a random 4-byte salt when none is given."""
        if salt is None:
            salt = os.urandom(4)
        return salt, hashlib.blake2s(data, key=self.__key, salt=salt).digest()

    def pack(self, payload: Any, packet_type: PacketTypes, *, serial: int | None = None) -> bytes:
        """A header followed by the serialized payload; a new serial unless one is given."""
        body = self.serializer.pack(payload)
        header = Header(packet_type, len(body), serial or self.get_serial())
        return header.pack() + body

    def authorize_request(self, token: bytes) -> bytes:
        salt, digest = self.digest(token)
        return self.pack((salt, digest, token), PacketTypes.AUTH_REQUEST)

    def authorize_check(self, payload: bytes) -> bool:
        salt, digest, token = self.serializer.unpack(payload)
        return self.digest(token, salt=salt) == (salt, digest)

    def pack_error(self, exception: Exception, serial: int) -> bytes:
        return self.pack(exception, PacketTypes.ERROR, serial=serial)


__all__ = ["Header", "PacketTypes", "Protocol"]
