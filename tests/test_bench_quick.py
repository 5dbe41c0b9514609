"""Smoke test of the benchmark harness: ``python -m bench --quick``.

It checks that the harness runs every system (ours, the original
patio==0.1.4 in its own cached venv, the raw-asyncio ceiling), that the
outputs exist and are well-formed, and that every call completed. It asserts
no timing at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = {"ours", "original", "ceiling"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-quick")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        # the first run builds the original patio's venv; cached runs take < 60 s.
        # Below pytest's own 300 s timeout, so a hang fails here, with the output.
        timeout=270,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "latest.jsonl").read_text().splitlines()
    assert lines, "latest.jsonl is empty"
    return [json.loads(line) for line in lines]


def test_outputs_exist(quick_run: Path) -> None:
    for name in ("latest.jsonl", "latest.md", "latest.png"):
        assert (quick_run / name).is_file(), name
        assert (quick_run / name).stat().st_size > 0, name
    assert (quick_run / "latest.png").read_bytes()[:8] == PNG_MAGIC


def test_jsonl_well_formed(quick_run: Path) -> None:
    records = _records(quick_run)
    assert records[0]["type"] == "meta"
    meta = records[0]
    assert meta["mode"] == "quick"
    assert meta["loop_policy"] in ("uvloop", "asyncio")
    assert set(meta["serializers"]) == SYSTEMS
    runs = [r for r in records if r["type"] == "run"]
    summaries = [r for r in records if r["type"] == "summary"]
    scenario_names = {s["name"] for s in meta["scenarios"]}
    assert {r["system"] for r in runs} == SYSTEMS
    assert {r["scenario"] for r in runs} == scenario_names
    # one record per system x scenario x run, one summary per system x scenario
    assert len(runs) == len(SYSTEMS) * len(scenario_names) * int(meta["runs"])
    assert len(summaries) == len(SYSTEMS) * len(scenario_names)
    for rec in runs:
        for key in ("system", "scenario", "run", "status", "loop_policy", "serializer"):
            assert key in rec, (key, rec)


def test_every_call_completed(quick_run: Path) -> None:
    runs = [r for r in _records(quick_run) if r["type"] == "run"]
    for rec in runs:
        assert rec["status"] == "ok", rec
        assert rec["all_completed"] is True, rec
        assert rec["issued"] == rec["completed"], rec
        assert rec["errors"] == 0, rec
        assert isinstance(rec["calls_per_s"], float | int)
        assert rec["rss_mb"], rec
    flood = [r for r in runs if str(r["scenario"]).startswith("flood")]
    assert flood and all(r["completed"] == r["issued"] for r in flood)


def test_markdown_table(quick_run: Path) -> None:
    md = (quick_run / "latest.md").read_text()
    assert "| scenario | ours | original | ceiling | ours/original | ours/ceiling |" in md
    records = _records(quick_run)
    for name in {s["name"] for s in records[0]["scenarios"]}:
        assert f"| {name} |" in md
