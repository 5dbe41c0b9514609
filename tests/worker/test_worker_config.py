"""Configuration: flags, PATIO_* variables, precedence and one-line errors (pure)."""

from __future__ import annotations

import pytest

from patio.worker.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    ConfigError,
    is_loopback,
    load_config,
    parse_peer_address,
    parse_peer_list,
)


def cfg(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(argv, env or {}, hostname="host", pid=7)


def test_defaults() -> None:
    c = cfg(["app:rpc"])
    assert c.registry == "app:rpc"
    assert (c.listen, c.port) == ("127.0.0.1", DEFAULT_PORT)
    assert (c.metrics_address, c.metrics_port) == ("127.0.0.1", DEFAULT_METRICS_PORT)
    assert c.node_id == "host-7"
    assert c.executor == "async" and c.max_workers is None
    assert c.ready_peer_ratio == 0.0 and c.drain_timeout == 30.0
    assert (c.log_level, c.log_format) == ("info", "plain")
    assert c.peers == () and c.peers_file is None and c.peers_dns is None
    assert not c.allow_empty_key and not c.tls_enabled
    assert (c.max_frame_size, c.max_buffered_output) == (16 << 20, 64 << 20)


def test_every_option_from_environment() -> None:
    env = {
        "PATIO_REGISTRY": "app.tasks:rpc",
        "PATIO_LISTEN": "10.0.0.5",
        "PATIO_PORT": "1234",
        "PATIO_NODE_ID": "worker-3",
        "PATIO_PEERS": "10.0.0.6:1234, 10.0.0.7",
        "PATIO_PEERS_FILE": "/etc/patio/peers",
        "PATIO_PEERS_DNS": "patio-headless.ns.svc:1234",
        "PATIO_KEY_FILE": "/etc/patio/key",
        "PATIO_NEXT_KEY_FILE": "/etc/patio/next-key",
        "PATIO_TLS_CERT": "c.pem",
        "PATIO_TLS_KEY": "k.pem",
        "PATIO_TLS_CA": "ca.pem",
        "PATIO_EXECUTOR": "thread",
        "PATIO_MAX_WORKERS": "8",
        "PATIO_METRICS_PORT": "9999",
        "PATIO_METRICS_ADDRESS": "0.0.0.0",
        "PATIO_READY_PEER_RATIO": "0.75",
        "PATIO_DRAIN_TIMEOUT": "12.5",
        "PATIO_LOG_LEVEL": "DEBUG",
        "PATIO_LOG_FORMAT": "json",
        "PATIO_ALLOW_EMPTY_KEY": "true",
        "PATIO_MAX_FRAME_SIZE": "1MiB",
        "PATIO_MAX_BUFFERED_OUTPUT": "4194304",
        "PATIO_MAX_PEER_CALL_BYTES": "8MiB",
    }
    c = cfg([], env)
    assert (c.max_frame_size, c.max_buffered_output) == (1 << 20, 4 << 20)
    assert c.max_peer_call_bytes == 8 << 20
    assert c.registry == "app.tasks:rpc"
    assert (c.listen, c.port, c.node_id) == ("10.0.0.5", 1234, "worker-3")
    assert c.peers == (("10.0.0.6", 1234), ("10.0.0.7", 1234))
    assert c.peers_file == "/etc/patio/peers"
    assert c.peers_dns == ("patio-headless.ns.svc", 1234)
    assert (c.key_file, c.key, c.next_key_file) == ("/etc/patio/key", None, "/etc/patio/next-key")
    assert (c.tls_cert, c.tls_key, c.tls_ca) == ("c.pem", "k.pem", "ca.pem")
    assert (c.executor, c.max_workers) == ("thread", 8)
    assert (c.metrics_address, c.metrics_port) == ("0.0.0.0", 9999)
    assert (c.ready_peer_ratio, c.drain_timeout) == (0.75, 12.5)
    assert (c.log_level, c.log_format, c.allow_empty_key) == ("debug", "json", True)


def test_every_option_as_flag() -> None:
    c = cfg([
        "--registry", "app:rpc", "--listen", "10.1.1.1", "--port", "2000", "--node-id", "n1",
        "--peers", "[::1]:2001,h2:2002", "--peers-file", "pf", "--peers-dns", "svc",
        "--key", "secret", "--next-key-file", "nk", "--tls-cert", "c", "--tls-key", "k",
        "--executor", "process", "--max-workers", "3", "--metrics-port", "0",
        "--metrics-address", "127.0.0.9", "--ready-peer-ratio", "1", "--drain-timeout", "0",
        "--log-level", "warning", "--log-format", "plain", "--allow-empty-key",
        "--max-frame-size", "512k", "--max-buffered-output", "2G",
    ])  # fmt: skip
    assert (c.max_frame_size, c.max_buffered_output) == (512 << 10, 2 << 30)
    assert c.peers == (("::1", 2001), ("h2", 2002))
    assert c.peers_dns == ("svc", 2000)  # the mesh port when the name has none
    assert c.key == "secret" and c.key_file is None
    assert not c.metrics_enabled and c.tls_enabled and c.tls_ca is None
    assert (c.executor, c.max_workers, c.drain_timeout) == ("process", 3, 0.0)
    assert c.allow_empty_key


def test_flag_wins_over_variable() -> None:
    env = {
        "PATIO_REGISTRY": "env:rpc",
        "PATIO_PORT": "1111",
        "PATIO_EXECUTOR": "thread",
        "PATIO_LOG_FORMAT": "json",
        "PATIO_KEY": "from-env",
    }
    c = cfg(["flag:rpc", "--port", "2222", "--executor", "async", "--key-file", "/k"], env)
    assert (c.registry, c.port, c.executor, c.log_format) == ("flag:rpc", 2222, "async", "json")
    # a key flag replaces both key variables instead of clashing with them
    assert (c.key_file, c.key) == ("/k", None)


def test_pod_environment_fallbacks() -> None:
    c = cfg(["app:rpc", "--key", "k"], {"POD_IP": "10.2.3.4", "POD_NAME": "patio-worker-1"})
    assert (c.listen, c.metrics_address, c.node_id) == ("10.2.3.4", "10.2.3.4", "patio-worker-1")


def test_empty_variable_counts_as_unset() -> None:
    assert cfg(["app:rpc"], {"PATIO_PORT": ""}).port == DEFAULT_PORT


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "no registry given"),
        (["app"], {}, "MODULE:ATTRIBUTE"),
        (["a:rpc", "--registry", "b:rpc"], {}, "registry given twice"),
        (["app:rpc", "--port", "x"], {}, "--port must be an integer"),
        (["app:rpc", "--port", "70000"], {}, "--port must be between 0 and 65535"),
        (["app:rpc"], {"PATIO_METRICS_PORT": "-1"}, "PATIO_METRICS_PORT must be between"),
        (["app:rpc"], {"PATIO_PORT": "x"}, "PATIO_PORT must be an integer, not 'x'"),
        (["app:rpc"], {"PATIO_EXECUTOR": "gpu"}, "PATIO_EXECUTOR must be one of"),
        (["app:rpc"], {"PATIO_MAX_WORKERS": "0"}, "PATIO_MAX_WORKERS must be at least 1"),
        (["app:rpc"], {"PATIO_DRAIN_TIMEOUT": "-1"}, "PATIO_DRAIN_TIMEOUT must not be"),
        (["app:rpc"], {"PATIO_LOG_LEVEL": "loud"}, "PATIO_LOG_LEVEL must be one of"),
        (["app:rpc"], {"PATIO_PEERS": "h:notaport"}, "PATIO_PEERS: malformed peer address"),
        (["app:rpc"], {"PATIO_PEERS_DNS": "[::1"}, "malformed PATIO_PEERS_DNS address"),
        (["app:rpc"], {"PATIO_TLS_CERT": "c"}, "PATIO_TLS_CERT and --tls-key must be"),
        (["app:rpc", "--executor", "gpu"], {}, "--executor must be one of"),
        (["app:rpc", "--max-workers", "0"], {}, "--max-workers must be at least 1"),
        (["app:rpc", "--max-peer-call-bytes", "0"], {}, "--max-peer-call-bytes must be at"),
        (["app:rpc"], {"PATIO_MAX_PEER_CALL_BYTES": "lots"}, "PATIO_MAX_PEER_CALL_BYTES must be a"),
        (["app:rpc", "--ready-peer-ratio", "1.5"], {}, "between 0 and 1"),
        (["app:rpc", "--drain-timeout", "-1"], {}, "must not be negative"),
        (["app:rpc", "--log-level", "loud"], {}, "--log-level must be one of"),
        (["app:rpc", "--log-format", "xml"], {}, "plain or json"),
        (["app:rpc", "--key", "a", "--key-file", "b"], {}, "exclusive"),
        (["app:rpc"], {"PATIO_KEY": "a", "PATIO_KEY_FILE": "b"}, "both set"),
        (["app:rpc", "--tls-cert", "c"], {}, "--tls-cert and --tls-key"),
        (["app:rpc", "--tls-ca", "ca"], {}, "--tls-ca needs"),
        (["app:rpc", "--peers", "[::1"], {}, "missing ']'"),
        (["app:rpc", "--peers", "h:notaport"], {}, "port is not a number"),
        (["app:rpc", "--peers", "fe80::1:x:y"], {}, "IPv6"),
        (["app:rpc", "--peers", "bad..host:1"], {}, "not an IP address or host name"),
        (["app:rpc"], {"PATIO_ALLOW_EMPTY_KEY": "maybe"}, "true or false"),
        (["app:rpc", "--bogus"], {}, "unrecognized arguments: --bogus"),
        (
            ["app:rpc", "--max-buffered-output", "lots"],
            {},
            "--max-buffered-output must be a size in bytes such as 67108864, 64MiB",
        ),
        (["app:rpc"], {"PATIO_MAX_FRAME_SIZE": "-5"}, "PATIO_MAX_FRAME_SIZE must be a size"),
        (["app:rpc"], {"PATIO_MAX_FRAME_SIZE": "1.5MiB"}, "PATIO_MAX_FRAME_SIZE must be a size"),
        (
            ["app:rpc", "--max-frame-size", "1k"],
            {},
            "--max-frame-size must be between 65536 and 4294967295 bytes, not 1024",
        ),
        (
            ["app:rpc", "--max-buffered-output", "1MiB"],
            {},
            "--max-buffered-output (1048576 bytes) must hold at least one frame of "
            "--max-frame-size (16777216 bytes): raise it or lower --max-frame-size",
        ),
        (["app:rpc", "--listen", "10.0.0.1"], {}, "no key for a worker listening on 10.0.0.1"),
    ],
)
def test_errors_are_one_line(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(argv, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_key_allowed_on_loopback_or_when_asked() -> None:
    assert cfg(["app:rpc", "--listen", "127.0.0.5"]).key is None
    assert cfg(["app:rpc", "--listen", "0.0.0.0", "--allow-empty-key"]).allow_empty_key
    assert cfg(["app:rpc", "--listen", "0.0.0.0"], {"PATIO_ALLOW_EMPTY_KEY": "1"}).allow_empty_key


def test_weak_key_allowed_only_when_asked() -> None:
    assert not cfg(["app:rpc", "--listen", "0.0.0.0", "--key", "k" * 40]).allow_weak_key
    assert cfg(["app:rpc", "--key", "hunter2", "--allow-weak-key"]).allow_weak_key
    assert cfg(["app:rpc", "--key", "hunter2"], {"PATIO_ALLOW_WEAK_KEY": "true"}).allow_weak_key


def test_peer_addresses() -> None:
    assert parse_peer_address("h", default_port=5) == ("h", 5)
    assert parse_peer_address("h:6", default_port=5) == ("h", 6)
    assert parse_peer_address("[::1]:7", default_port=5) == ("::1", 7)
    assert parse_peer_address("[::1]", default_port=5) == ("::1", 5)
    assert parse_peer_address("fe80::1", default_port=5) == ("fe80::1", 5)
    assert parse_peer_list("a:1 b:2,a:1", default_port=5) == (("a", 1), ("b", 2))
    assert is_loopback("127.0.0.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
