"""`patio local` end to end, and a real Prometheus server scraping real workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from .conftest import Spawner
from .helpers import REPO, free_port, http_get, patio_env
from .test_worker_cluster import caller, mesh_pair

PROMETHEUS = Path("/usr/bin/prometheus")


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@pytest.mark.slow
def test_patio_local_runs_the_demo_and_leaves_nothing_behind() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "patio", "local", "--calls", "200"],
        capture_output=True, text=True, timeout=120, env=patio_env(), cwd=str(REPO), check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "all 3 workers ready" in out
    total = re.search(r"total: (\d+) calls in ([\d.]+)s = ([\d,]+) calls/s; latency p50", out)
    assert total and total.group(1) == "200", out
    for task in ("mul", "sha256", "lookup", "flaky"):
        assert re.search(rf"^  {task} +\d+ +\d+ +\d+ ", out, re.M), out
    assert "errors (on purpose): ValueError" in out  # flaky fails by design, visibly
    executed = [int(n) for n in re.findall(r"local-\d  executed (\d+) calls", out)]
    assert len(executed) == 3 and sum(executed) >= 200, out
    assert "patio local: stopped all workers" in out
    # nothing still listens where the workers were
    for host, port in re.findall(r"mesh (127\.0\.0\.\d+):(\d+)", out):
        assert not listening(host, int(port)), (host, port)
    assert elapsed < 60


@pytest.mark.slow
def test_patio_local_stops_its_workers_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "patio", "local", "--no-workload", "--keep-running",
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=patio_env(),
        cwd=str(REPO), start_new_session=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        addresses = re.findall(r"mesh (127\.0\.0\.\d+):(\d+)", "".join(lines))
        assert len(addresses) == 2, "".join(lines)
        assert all(listening(h, int(p)) for h, p in addresses)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert "stopped all workers" in rest, rest
        assert proc.returncode == 0  # Ctrl-C/SIGTERM is how --keep-running ends
        assert not any(listening(h, int(p)) for h, p in addresses)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.slow
async def test_prometheus_scrapes_the_workers(spawn: Spawner, tmp_path: Path) -> None:
    if not PROMETHEUS.exists():  # noqa: ASYNC240
        pytest.fail(
            f"{PROMETHEUS} is missing: this test needs a real Prometheus server "
            "(apt-get update && apt-get install -y prometheus)"
        )
    key = tmp_path / "key"
    key.write_text("prom-key\n")
    a, b = mesh_pair(spawn, "--key-file", str(key))
    calls = 37
    # a mesh member as caller: it picks the executing worker itself, so no
    # call is forwarded and each is counted by exactly one executor
    async with caller([(a.host, a.port), (b.host, b.port)], "prom-key") as broker:
        results = await asyncio.gather(
            *(broker.call("mul", i, 2, timeout=10) for i in range(calls))
        )
    assert results == [i * 2 for i in range(calls)]

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: patio\n    static_configs:\n"
        f"      - targets: ['{a.host}:{a.metrics_port}', '{b.host}:{b.metrics_port}']\n"
    )
    prom_log = tmp_path / "prometheus.log"
    log = open(prom_log, "wb")  # noqa: ASYNC230, SIM115 - closed in finally
    prom = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in finally
        [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    query = 'sum(patio_calls_finished_total{side="executor",outcome="ok"})'

    async def promql(expr: str) -> float | None:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            status, body = await asyncio.to_thread(http_get, url)
        except OSError:
            return None
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result else None

    try:
        deadline = time.monotonic() + 60
        value = up = None
        while time.monotonic() < deadline:
            assert prom.poll() is None, prom_log.read_text()
            # both targets scraped at least once, and the calls all counted
            up = await promql('sum(up{job="patio"})')
            value = await promql(query)
            if up == 2 and value == calls:
                break
            await asyncio.sleep(0.5)
        assert (up, value) == (2, calls), prom_log.read_text()[-2000:]
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(prom.pid, signal.SIGKILL)
            prom.wait(5)
        log.close()
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
