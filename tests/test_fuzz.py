"""Coverage-guided fuzzing (tests/fuzz) in the suite, and what it found.

``test_every_fuzz_target_runs_clean`` runs each target of tests/fuzz/targets.py
for a few seconds under libFuzzer (atheris), from the seed corpus in
tests/fuzz/corpus: a crash, a hang or memory past the limit fails it with the
input that caused it. The long run is in docs/hardening.md.

The other tests pin the inputs the fuzzer found, so they stay fixed.
"""

from __future__ import annotations

import math
import pickle
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patio.broker.serializer import RestrictedPickleSerializer
from patio.errors import PickleRefusedError
from patio.proto import Connection, KeySet, Role

REPO = Path(__file__).resolve().parent.parent
SECONDS_PER_TARGET = 5


@pytest.mark.slow
def test_every_fuzz_target_runs_clean(tmp_path: Path) -> None:
    limits = ["--seconds", str(SECONDS_PER_TARGET), "--rss-mb", "512", "--timeout", "10"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "run", *limits, "--work", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 7 and all(" ok " in line for line in lines), lines
    # Every target ran inputs beyond its seeds.
    assert all(int(line.split("runs=")[1].split()[0]) > 100 for line in lines), lines


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_restricted_pickle_memo_index_cannot_allocate() -> None:
    """11 bytes naming memo slot 150 000 000 made the C unpickler take 2.3 GB and 5 s."""
    before = _peak_rss_mb()
    started = time.monotonic()
    payload = b"\x80\x05N" + b"r" + struct.pack("<I", 150_000_000) + b"."
    assert RestrictedPickleSerializer().unpack(payload) is None
    assert time.monotonic() - started < 1.0
    assert _peak_rss_mb() - before < 100


def test_restricted_pickle_bytearray8_cannot_claim_more_than_it_holds() -> None:
    """A BYTEARRAY8 claiming 16 GiB next to a global was zero-filled before reading."""
    payload = (
        b"\x80\x05\x8c\x08builtins\x8c\x05range\x93K\x00K\x03K\x01\x87R0"  # a global: checked path
        + b"\x96"
        + struct.pack("<Q", 1 << 34)
        + b"x."
    )
    before = _peak_rss_mb()
    with pytest.raises(PickleRefusedError, match="truncated"):
        RestrictedPickleSerializer().unpack(payload)
    assert _peak_rss_mb() - before < 100


def test_restricted_pickle_still_reads_memo_and_bytearrays() -> None:
    value = [bytearray(b"abc"), range(3)]
    value.append(value[0])  # a shared object: written with a memo reference
    for protocol in (3, 4, 5):
        got = RestrictedPickleSerializer().unpack(pickle.dumps(value, protocol=protocol))
        assert got == value and got[2] is got[0]
    many = [str(i) for i in range(70_000)] * 2  # memo indexes past 65536: the checked path
    assert RestrictedPickleSerializer().unpack(pickle.dumps(many, protocol=2)) == many


def test_the_sender_refuses_a_nan_timeout_the_peer_would_refuse() -> None:
    """Found by the round-trip target: a NaN timeout was queued, then the peer closed the link."""
    keys = KeySet(b"k")
    ours = Connection(Role.ACCEPTOR, "a", "ia", keys)
    theirs = Connection(Role.DIALER, "d", "id", keys)
    theirs.receive_data(ours.data_to_send())
    ours.receive_data(theirs.data_to_send())
    theirs.receive_data(ours.data_to_send())
    with pytest.raises(ValueError, match="NaN"):
        theirs.send_call(1, "mul", b"", math.nan, False)
    theirs.send_call(2, "mul", b"", math.inf, False)  # no deadline: allowed
    assert [m[1] for m in ours.receive_data(theirs.data_to_send())] == [2]


def test_restricted_pickle_call_arguments_must_be_a_tuple() -> None:
    """REDUCE star-expanded a range(55 million) given as its arguments: 2 GB, then TypeError."""
    payload = (
        b"\x80\x05\x8c\x01r\x8c\x08builtins\x8c\x05range\x93"
        + b"K\x00J"
        + struct.pack("<i", 55_274_610)
        + b"K\x01\x87R"  # range(0, 55274610, 1)
        + b"R."  # 'r'(*that range)
    )
    before = _peak_rss_mb()
    with pytest.raises(PickleRefusedError, match="only a tuple"):
        RestrictedPickleSerializer().unpack(payload)
    assert _peak_rss_mb() - before < 100
