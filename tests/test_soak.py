"""The soak's short run: ``bash bench/soak.sh 3`` must pass (about 3.5 minutes).

Six worker processes under steady load while members are killed, restarted,
added and removed every few seconds: no retryable call lost, none hung, no
growth of RSS, fds or tasks after the warm-up (bench/soak.py has the rules).
The 30-minute run and its figures are in docs/hardening.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_three_minute_soak_with_churn_passes(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "3",
            "--report-every",
            "15",
            "--warmup",
            "45",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # below the test's own timeout, so a hang fails here with the output
        check=False,
    )
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("PASS")
    assert out.exists()
