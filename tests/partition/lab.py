"""Network namespaces joined by a bridge, to cut and slow links between members.

Layout for a lab of N members (TAG is ``ptest-<pid>``)::

    root namespace: bridge TAG-br, 10.251.S.1/24   (the test process, the caller)
      |- veth TAG-vI  <->  eth0 in namespace TAG-mI, 10.251.S.(10+I)/24

10.251.0.0/16 is this lab's private range and is used nowhere else in the
project; S comes from the pid so that two runs at once do not meet. Faults
are iptables rules and NFQUEUE delays inside the member namespaces only:
nothing is changed in the root namespace but the bridge and veths, which
:meth:`Lab.teardown` removes (with the namespaces and every process in them)
even after a failure. Stale labs of dead test processes are swept first.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "ptest-"
ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def missing_tools() -> list[str]:
    return [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _run("ip", "-o", "link", "show", check=False).stdout
    return re.findall(r"^\d+: ([^:@]+)", out, re.M)


def _remove(tag: str) -> list[str]:
    """Delete everything named ``tag-*``; return what could not be removed."""
    for ns in _namespaces():
        if ns.startswith(tag + "-"):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _run("ip", "netns", "pids", ns, check=False).stdout.split():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            _run("ip", "netns", "del", ns, check=False)
    for link in _links():
        if link.startswith(tag + "-"):
            _run("ip", "link", "del", link, check=False)
    left = [ns for ns in _namespaces() if ns.startswith(tag + "-")]
    return left + [link for link in _links() if link.startswith(tag + "-")]


def sweep_stale() -> None:
    """Remove labs whose test process is gone (a run killed before its teardown)."""
    for name in {*_namespaces(), *_links()}:
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _remove(f"{PREFIX}{match.group(1)}")


class Lab:
    def __init__(self, size: int) -> None:
        pid = os.getpid()
        self.size = size
        self.tag = f"{PREFIX}{pid}"
        self.subnet = f"10.251.{pid % 250 + 1}"
        self.gateway = f"{self.subnet}.1"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._delays: dict[int, subprocess.Popen[bytes]] = {}

    def ns(self, index: int) -> str:
        return f"{self.tag}-m{index}"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def setup(self) -> None:
        sweep_stale()
        try:
            bridge = f"{self.tag}-br"
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
            for index in range(self.size):
                ns, outer, inner = self.ns(index), f"{self.tag}-v{index}", f"{self.tag}-i{index}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
                _run("ip", "link", "set", inner, "netns", ns)
                _run("ip", "link", "set", outer, "master", bridge)
                _run("ip", "link", "set", outer, "up")
                self.exec(index, "ip", "link", "set", "lo", "up")
                self.exec(index, "ip", "link", "set", inner, "name", "eth0")
                self.exec(index, "ip", "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
                self.exec(index, "ip", "link", "set", "eth0", "up")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        for proc in [*self.processes, *self._delays.values()]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        left = _remove(self.tag)
        if left:
            raise RuntimeError(f"could not remove {left}")

    def exec(self, index: int, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns(index), *argv)

    def python(self, index: int, *args: str) -> subprocess.Popen[bytes]:
        """``python ARGS`` inside member ``index``'s namespace, stdout piped."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(index), sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    # -- faults, all inside member namespaces -----------------------------------

    def iptables(self, index: int, *rule: str) -> None:
        self.exec(index, "iptables", "-w", *rule)

    def silence(self, index: int) -> None:
        """Everything to and from the member is dropped: no RST, no ICMP."""
        self.iptables(index, "-A", "INPUT", "-i", "eth0", "-j", "DROP")
        self.iptables(index, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")

    def deafen(self, index: int) -> None:
        """One way: the member still sends, but receives nothing."""
        self.iptables(index, "-A", "INPUT", "-i", "eth0", "-j", "DROP")

    def cut(self, index: int, others: list[int]) -> None:
        """No packet between the member and ``others``; everyone else still reaches it."""
        for other in others:
            self.iptables(index, "-A", "INPUT", "-s", self.address(other), "-j", "DROP")
            self.iptables(index, "-A", "OUTPUT", "-d", self.address(other), "-j", "DROP")

    def lose(self, index: int, share: float) -> None:
        """Drop ``share`` of the member's packets at random, in and out."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.iptables(
                index, "-A", chain, flag, "eth0",
                "-m", "statistic", "--mode", "random", "--probability", str(share), "-j", "DROP",
            )  # fmt: skip

    def delay(self, index: int, milliseconds: int) -> None:
        """Hold every packet the member sends for ``milliseconds`` (NFQUEUE, no netem here)."""
        proc = self.python(index, "-m", "tests.partition.delay", "1", str(milliseconds))
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != b"READY":
            raise RuntimeError(f"the delay process did not start: {line!r}")
        self._delays[index] = proc
        self.iptables(index, "-A", "OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", "1")

    def heal(self, index: int) -> None:
        self.iptables(index, "-F")
        proc = self._delays.pop(index, None)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
