"""The seed corpus: one valid example of everything, and the classic bad ones.

``python -m tests.fuzz seed`` writes these under tests/fuzz/corpus/TARGET/
(files named by content, so rewriting is idempotent). They are built with
patio's own encoders so they stay valid when the protocol changes: rerun the
command then and commit the result.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import pickle
import struct
import uuid
from collections import Counter, OrderedDict, deque
from fractions import Fraction
from pathlib import Path

import msgpack

from patio.broker.serializer import MsgpackSerializer, exception_to_payload
from patio.proto import Connection, KeySet, Role

CORPUS = Path(__file__).resolve().parent / "corpus"

# The longest input each target gets (libFuzzer's -max_len): past the frame
# limits the targets use, so the fuzzer meets them.
MAX_LEN = {
    "handshake": 2048,
    "open_stream": 8192,
    "open_frames": 4096,
    "forged": 4096,
    "roundtrip": 1024,
    "msgpack": 4096,
    "restricted_pickle": 4096,
}

_HEADER = struct.Struct(">I")


def _frame(message: object) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _handshake_seeds() -> list[bytes]:
    keys = KeySet(b"fuzz-key")
    ours = Connection(Role.ACCEPTOR, "fuzz-acceptor", "acceptor-1", keys, nonce=bytes(range(32)))
    theirs = Connection(Role.DIALER, "fuzz-dialer", "dialer-1", keys, nonce=bytes(range(32, 64)))
    hello = theirs.data_to_send()
    theirs.receive_data(ours.data_to_send())
    auth = theirs.data_to_send()
    nonce = bytes(range(100, 132))
    return [
        hello + auth,
        hello,
        _frame([0, "patio", 2, "n", "i", nonce]),  # another protocol version
        _frame([0, "http", 1, "n", "i", nonce]),
        _frame([0, "patio", 1, "n" * 300, "i", nonce]),
        _frame([0, "patio", 1, "n", "i", bytes(range(32))]),  # our own nonce echoed
        hello + _frame([1, b"\0" * 32]),  # a wrong proof
        hello + _frame([3, 1, "work", b"", None, False]),  # a call before auth
        _HEADER.pack(4096) + b"x",  # a frame past the handshake limit
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ]


def _open_messages() -> list[list[object]]:
    return [
        [2, ["work", "whoami"], ["routed"], 8, 64, False],
        [3, 1, "work", msgpack.packb([[6, 7], {}]), 5.0, False],
        [3, 2, "work", b"", None, True],
        [4, 1, msgpack.packb(42)],
        [5, 1, 0, msgpack.packb({"type": "builtins.ValueError", "args": ["x"]})],
        [5, 2, 1, b"no such task"],
        [6, 3],
        [7],
        [8],
        [9, "draining"],
        [10],
    ]


def _open_bad_messages() -> list[list[object]]:
    return [
        [3, 1, "work", b"", float("nan"), False],
        [3, 1, "work", b"", float("inf"), False],
        [3, -1, "work", b"", -1, False],
        [3, 1, 7, b"", None, False],
        [2, ["x" * 2000], [], 1, 1, False],
        [4, "1", b""],
        [10],
        [0, "patio", 1, "n", "i", b"\0" * 32],
    ]


def _sealed(messages: list[list[object]]) -> bytes:
    """``messages`` as the fuzz targets' open dialer sends them (tagged)."""
    from tests.fuzz.targets import open_dialer

    theirs = open_dialer()
    for message in messages:
        theirs.send_frame(msgpack.packb(message, use_bin_type=True))
    return theirs.data_to_send()


def _open_stream_seeds() -> list[bytes]:
    good = [_sealed([m]) for m in _open_messages()]
    bad = [_sealed([m]) for m in _open_bad_messages()]
    return [
        _sealed(_open_messages()),
        *good,
        *bad,
        _frame([3, 1, "work", b"", None, False]),  # a call without a tag: injected
        _HEADER.pack(5000) + b"x" * 100,  # past the (fuzzing) frame limit
        _frame([7]) * 20,
        _HEADER.pack(1) + b"\xc1",  # a byte msgpack never uses
    ]


def _open_frames_seeds() -> list[bytes]:
    seeds = []
    for message in _open_messages() + _open_bad_messages():
        body = msgpack.packb(message, use_bin_type=True)
        if len(body) < 256:
            seeds.append(bytes([len(body)]) + body)
    seeds.append(b"".join(seeds))
    return seeds


def _msgpack_seeds() -> list[bytes]:
    serializer = MsgpackSerializer()
    values: list[object] = [
        None,
        True,
        -(2**63),
        2**200,
        1.5,
        float("nan"),
        "text",
        b"\0bytes",
        [1, [2, [3]]],
        {"a": 1, 2: "b", (1, 2): None},
        (1, (2, 3)),
        {1, 2},
        frozenset({"x"}),
        datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
        datetime.date(2026, 1, 2),
        datetime.time(3, 4, 5),
        datetime.timedelta(days=1, microseconds=3),
        complex(1, -2),
        decimal.Decimal("1.10"),
        uuid.UUID(int=7),
    ]
    seeds = [serializer.pack(v) for v in values]
    for exc in (ValueError("bad", 1), KeyError("k"), OSError(2, "gone"), SystemExit(3)):
        seeds.append(serializer.pack(exception_to_payload(exc, serializer)))
    seeds.append(serializer.pack({"type": "patio.errors.RemoteError", "args": [], "message": ""}))
    return seeds


def _pickle_seeds() -> list[bytes]:
    values: list[object] = [
        None,
        [1, "two", b"three", 4.0, (5,), {6}, frozenset({7})],
        {"a": bytearray(b"x"), "r": range(3), "s": slice(1, 2)},
        datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
        decimal.Decimal("1.1"),
        Fraction(1, 3),
        uuid.UUID(int=9),
        OrderedDict(a=1),
        deque([1, 2]),
        Counter("aab"),
        ValueError("bad"),
        complex(1, 2),
    ]
    seeds = [pickle.dumps(v, protocol=p) for v in values for p in (0, 2, 5)]
    seeds.append(b"cos\nsystem\n(S'true'\ntR.")  # a refused global
    return seeds


def seeds() -> dict[str, list[bytes]]:
    return {
        "handshake": _handshake_seeds(),
        "open_stream": _open_stream_seeds(),
        "open_frames": _open_frames_seeds(),
        "forged": [b"\0\5" + seed for seed in _open_frames_seeds()],
        "roundtrip": [b"", bytes(range(256)), b"\xff" * 64, b"\x01" * 200],
        "msgpack": _msgpack_seeds(),
        "restricted_pickle": _pickle_seeds(),
    }


def write_seeds() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
            (folder / name).write_bytes(data)
        print(f"{target}: {len(inputs)} seeds in {folder}")
