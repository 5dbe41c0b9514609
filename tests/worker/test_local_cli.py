"""`patio local` as a user drives it: Ctrl-C, its own key, printed commands, a dying worker."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import REPO, patio_env


class Running:
    """`patio local` in its own session, its output read line by line with deadlines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patio", "local", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=patio_env(),
            cwd=str(REPO), start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.finished = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout}s:\n{''.join(self.seen)}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"exited before {pattern!r}:\n{''.join(self.seen)}"
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def finish(self, timeout: float = 60) -> str:
        self.proc.wait(timeout)
        while not self.finished and (line := self.lines.get(timeout=5)) is not None:
            self.seen.append(line)
        self.finished = True
        out = "".join(self.seen)
        # A worker that died makes patio local keep the logs for the user; not here.
        for kept in re.findall(r"worker logs kept in (\S+)", out):
            shutil.rmtree(kept, ignore_errors=True)
        return out


@contextmanager
def running(*args: str) -> Iterator[Running]:
    run = Running(*args)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            try:
                run.proc.wait(30)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait(5)
        run.finish()


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_ctrl_c_prints_the_results_so_far() -> None:
    with running("-n", "1", "--duration", "120", "--concurrency", "4") as run:
        address = run.until(r"local-0  mesh (\S+)").group(1)
        run.until(r"^workload: ")
        time.sleep(1.5)
        run.proc.send_signal(signal.SIGINT)
        out = run.finish()
    assert run.proc.returncode == 130, out
    made = re.search(r"interrupted; results of the (\d+) calls made so far", out)
    assert made and int(made.group(1)) > 0, out
    total = re.search(r"total: (\d+) calls in", out)
    assert total and total.group(1) == made.group(1), out
    assert not listening(address)


@pytest.mark.slow
def test_own_key_printed_commands_and_a_dying_worker(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("my-own-key\n")
    with running("-n", "2", "--no-workload", "--keep-running", "--key-file", str(key)) as run:
        pids = {}
        for _ in range(2):
            found = run.until(r"(local-\d)  mesh \S+ .* pid (\d+)")
            pids[found.group(1)] = int(found.group(2))
        call_line = run.until(r"^\s+(\S.* call --peer .*)$").group(1)
        run.until("Ctrl-C stops it")
        # The printed command, exactly as printed, reaches the cluster with our key.
        assert f"--key-file {key}" in call_line
        called = subprocess.run(
            shlex.split(call_line), capture_output=True, text=True, env=patio_env(),
            cwd=str(tmp_path), timeout=60, check=False,
        )  # fmt: skip
        assert (called.returncode, called.stdout) == (0, "42\n"), called.stderr
        # A worker killed: reported at once, with how it died.
        killed_at = time.monotonic()
        os.kill(pids["local-1"], signal.SIGKILL)
        run.until(rf"worker local-1 \(\S+, pid {pids['local-1']}\) was killed by SIGKILL", 10)
        assert time.monotonic() - killed_at < 5
        run.proc.send_signal(signal.SIGTERM)
        out = run.finish()
    assert run.proc.returncode == 1, out  # a worker died: not a clean run
    assert key.read_text() == "my-own-key\n"  # the user's key file is left alone


@pytest.mark.slow
def test_patio_status_lists_every_member(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("status-key\n")
    with running("-n", "3", "--no-workload", "--keep-running", "--key-file", str(key)) as run:
        pids = {}
        for _ in range(3):
            found = run.until(r"(local-\d)  mesh \S+ .* pid (\d+)")
            pids[found.group(1)] = int(found.group(2))
        status_line = run.until(r"^\s+(\S.* status --peer .*)$").group(1)
        run.until("Ctrl-C stops it")
        command = shlex.split(status_line)

        def status(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*command, *extra], capture_output=True, text=True, env=patio_env(),
                cwd=str(tmp_path), timeout=60, check=False,
            )  # fmt: skip

        # Ready does not wait for links (docs/worker-contract.md): they come up just after.
        deadline = time.monotonic() + 15
        while (table := status()).stdout.count(" 2/2 ") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert table.returncode == 0, table.stderr
        rows = [line for line in table.stdout.splitlines() if line.startswith("local-")]
        assert [row.split()[0] for row in rows] == ["local-0", "local-1", "local-2"], table.stdout
        assert all("2/2" in row and "mul, sha256" in row.replace("flaky, lookup, ", "")
                   for row in rows), table.stdout  # fmt: skip
        assert "3 members" in table.stdout

        members = json.loads(status("--json").stdout)["members"]
        assert sorted(m["node_id"] for m in members if m.get("addresses")) == [
            "local-0", "local-1", "local-2"]  # fmt: skip
        for member in members:
            if member.get("addresses"):
                assert member["links_up"] == member["links_known"] == 2
                assert {"mul", "sha256", "lookup", "flaky"} <= set(member["tasks"])
                assert member["executor"] == "AsyncExecutor" and member["capacity"] > 0

        # --watch refreshes until Ctrl-C, which ends it cleanly.
        watch = subprocess.Popen(
            [*command, "--json", "--watch", "0.2"], stdout=subprocess.PIPE, text=True,
            env=patio_env(), cwd=str(tmp_path),
        )  # fmt: skip
        time.sleep(2.5)
        watch.send_signal(signal.SIGINT)
        watched, _ = watch.communicate(timeout=30)
        assert watch.returncode == 0, watched
        frames = [json.loads(line) for line in watched.splitlines()]
        assert len(frames) >= 2 and all(len(f["members"]) == 3 for f in frames), watched

        os.kill(pids["local-2"], signal.SIGKILL)
        run.until("worker local-2 .* was killed by SIGKILL", 10)
        deadline = time.monotonic() + 15
        while True:
            after = status()
            if "UNREACHABLE" in after.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after.returncode == 1, after.stdout + after.stderr
        down = [line for line in after.stdout.splitlines() if line.startswith("local-2")]
        assert down and "UNREACHABLE" in down[0], after.stdout
