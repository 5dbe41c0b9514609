"""Key strength and the published fingerprint (patio/proto/keys.py, issue 16 item 7)."""

from __future__ import annotations

import hashlib
import logging
import secrets
import subprocess
import sys

import pytest

from patio import AsyncExecutor, NullExecutor, Registry, TCPClientBroker, TCPServerBroker
from patio.errors import WeakKeyError
from patio.proto import KeySet, keys

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]

# The six-word dictionary the issue used to recover `hunter2`.
DICTIONARY = [b"password", b"123456", b"letmein", b"hunter2", b"shared secret", b"qwerty"]
STRONG = secrets.token_urlsafe(32).encode()  # what `patio keygen` prints


def old_fingerprint(key: bytes) -> str:
    """The fingerprint /metrics published before: an unsalted 48-bit SHA-256 prefix."""
    return hashlib.sha256(b"patio-key-fingerprint:" + key).hexdigest()[:12]


@pytest.mark.parametrize(
    ("key", "weak"),
    [
        (b"shared secret", True),
        (b"hunter2", True),
        (b"0123456789abcdef", True),  # 16 hex digits: 64 bits
        (b"\x00" * 8, True),
        (STRONG, False),
        (secrets.token_hex(16).encode(), False),  # 32 hex digits: 128 bits
        (bytes(range(16)), False),  # 16 binary bytes
        (b"", False),  # empty is its own rule (allow_empty_key), not "weak"
    ],
)
def test_weak_keys_are_recognised(key: bytes, weak: bool) -> None:
    assert keys.is_weak(key) is weak


def test_a_dictionary_no_longer_recovers_a_key_from_its_fingerprint() -> None:
    published_before = old_fingerprint(b"hunter2")
    assert [w for w in DICTIONARY if old_fingerprint(w) == published_before] == [b"hunter2"]
    # Now a weak key's fingerprint is the same for every weak key: nothing
    # singles out the right guess.
    published = KeySet(b"hunter2").fingerprint
    assert published == keys.WEAK_KEY_FINGERPRINT
    assert {keys.fingerprint(w) for w in DICTIONARY} == {keys.WEAK_KEY_FINGERPRINT}


def test_strong_keys_get_a_long_keyed_fingerprint() -> None:
    other = secrets.token_urlsafe(32).encode()
    fp = keys.fingerprint(STRONG)
    assert len(fp) == 32 and int(fp, 16) >= 0  # 128 bits of hex
    assert fp != keys.fingerprint(other)
    assert fp != old_fingerprint(STRONG)[:12] and STRONG.hex() not in fp
    assert KeySet(STRONG, (other,)).fingerprint == fp  # names the primary only


async def test_weak_key_is_refused_off_loopback_saying_how_to_make_one() -> None:
    # Issue 16 item 7: any stranger who connects collects the acceptor's
    # proof and can test guesses of a weak key offline.
    async with (
        AsyncExecutor(Registry()) as executor,
        TCPServerBroker(executor, key=b"hunter2") as server,
    ):
        with pytest.raises(WeakKeyError, match="patio keygen") as err:
            await server.listen("0.0.0.0", 0)
        assert "allow_weak_key=True" in str(err.value)
        assert server.listening == []


async def test_weak_key_off_loopback_allowed_explicitly(caplog: pytest.LogCaptureFixture) -> None:
    async with (
        AsyncExecutor(Registry()) as executor,
        TCPServerBroker(executor, key=b"hunter2", allow_weak_key=True) as server,
    ):
        with caplog.at_level(logging.WARNING):
            await server.listen("0.0.0.0", 0)
        assert server.listening
    assert "weak patio key" in caplog.text and "allowed explicitly" in caplog.text


async def test_weak_key_on_loopback_warns_and_works(caplog: pytest.LogCaptureFixture) -> None:
    # The README's examples use b"shared secret" on loopback, unchanged.
    rpc = Registry()
    rpc["mul"] = lambda a, b: a * b
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=b"shared secret") as server,
    ):
        with caplog.at_level(logging.WARNING):
            await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        async with (
            NullExecutor(Registry()) as null,
            TCPClientBroker(null, key=b"shared secret") as client,
        ):
            await client.connect("127.0.0.1", port)
            assert await client.call("mul", 6, 7, timeout=5) == 42
    assert "weak patio key" in caplog.text and "(loopback)" in caplog.text


async def test_weak_key_is_not_sent_to_a_remote_acceptor() -> None:
    # A dialler proves itself too, to whoever answers: an impostor collects it.
    async with (
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=b"hunter2") as client,
    ):
        with pytest.raises(WeakKeyError, match=r"dialling 192\.0\.2\.1"):
            await client.connect("192.0.2.1", 15383)  # TEST-NET-1: never dialled


async def test_rotating_to_a_weak_key_is_refused_and_changes_nothing() -> None:
    async with (
        AsyncExecutor(Registry()) as executor,
        TCPServerBroker(executor, key=STRONG) as server,
    ):
        await server.listen("0.0.0.0", 0)
        before = server.key_fingerprint
        with pytest.raises(WeakKeyError):
            server.set_keys(b"hunter2", [STRONG])
        assert server.key_fingerprint == before


@pytest.mark.parametrize("command", ["call", "status"])
def test_cli_refuses_a_weak_key_off_loopback_at_once(command: str) -> None:
    argv = [sys.executable, "-m", "patio", command, "--peer", "192.0.2.1:15383"]
    argv += [
        "--key",
        "hunter2",
        "--timeout",
        "5",
        *(["mul", "1", "2"] if command == "call" else []),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "refusing a weak key dialling 192.0.2.1" in result.stderr
    assert "patio keygen" in result.stderr and "--allow-weak-key" in result.stderr
