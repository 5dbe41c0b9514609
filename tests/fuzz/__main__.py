"""Run the fuzz targets: ``python -m tests.fuzz run [TARGET ...] [options]``.

Examples (from the repository root, with the virtualenv's python)::

    python -m tests.fuzz run --seconds 10            # each target 10 s (the suite's run)
    python -m tests.fuzz run --runs 2000000 --work /var/tmp/patio-fuzz \\
        --log /var/tmp/patio-fuzz/runs.jsonl        # the long run, counted
    python -m tests.fuzz seed                       # rewrite the seed corpus
    python -m tests.fuzz total /var/tmp/patio-fuzz/runs.jsonl
    python -m tests.fuzz coverage --work /var/tmp/patio-fuzz   # line coverage (coverage.py)
    python -m tests.fuzz minimize /var/tmp/patio-fuzz   # keep what is new in the seeds

Each target runs in its own libFuzzer process (tests/fuzz/child.py) with the
seeds of tests/fuzz/corpus/TARGET read only, and new inputs written to
WORK/TARGET. A crash, a hang (``--timeout`` seconds on one input) or memory
past ``--rss-mb`` stops that target with the input saved under WORK, and makes
the command exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fuzz.seeds import CORPUS, MAX_LEN, write_seeds

ROOT = Path(__file__).resolve().parents[2]
TARGETS = list(MAX_LEN)
_COVERAGE = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_RUNS = re.compile(r"stat::number_of_executed_units: (\d+)")
_PEAK = re.compile(r"stat::peak_rss_mb: +(\d+)")


def run_one(target: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out_dir = work / target
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    limits = [f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]
    command = [
        sys.executable, "-m", "tests.fuzz.child", target, str(out_dir), str(seeds),
        *limits,
        f"-rss_limit_mb={args.rss_mb}",
        f"-timeout={args.timeout}",
        f"-max_len={MAX_LEN[target]}",
        f"-artifact_prefix={work}/{target}-",
        "-print_final_stats=1",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    output = proc.stderr + proc.stdout
    # The final statistics (-print_final_stats), and the last coverage line:
    # "cov" counts the instrumented edges of patio's Python code reached.
    coverage = _COVERAGE.findall(output)
    runs = _RUNS.search(output)
    result: dict[str, Any] = {
        "target": target,
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "runs": int(runs.group(1)) if runs else 0,
        "cov": int(coverage[-1][0]) if coverage else None,
        "ft": int(coverage[-1][1]) if coverage else None,
        "corpus": int(coverage[-1][2]) if coverage else None,
        "peak_rss_mb": int(peak.group(1)) if (peak := _PEAK.search(output)) else None,
        "seconds": round(elapsed, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not result["ok"]:
        result["output"] = output[-6000:]
    return result


def run(args: argparse.Namespace) -> int:
    targets = args.targets or TARGETS
    unknown = set(targets) - set(TARGETS)
    if unknown:
        print(f"unknown targets {sorted(unknown)}; known: {TARGETS}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="patio-fuzz-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        failed = False
        for target in targets:
            result = run_one(target, args, work)
            line = (
                f"{target:18} {'ok' if result['ok'] else 'FAILED':6} runs={result['runs']:<9} "
                f"cov={result['cov']} ft={result['ft']} corpus={result['corpus']} "
                f"{result['seconds']} s"
            )
            print(line, flush=True)
            if args.log:
                with open(args.log, "a") as log:
                    log.write(json.dumps({k: v for k, v in result.items() if k != "output"}))
                    log.write("\n")
            if not result["ok"]:
                failed = True
                print(result["output"], file=sys.stderr, flush=True)
        return 1 if failed else 0


def total(args: argparse.Namespace) -> int:
    """A table of the inputs run per target, from a --log file (latest coverage)."""
    runs: dict[str, int] = {}
    seconds: dict[str, float] = {}
    latest: dict[str, dict[str, Any]] = {}
    failed: dict[str, int] = {}
    peak: dict[str, int] = {}
    for line in Path(args.log).read_text().splitlines():
        entry = json.loads(line)
        target = entry["target"]
        runs[target] = runs.get(target, 0) + entry["runs"]
        seconds[target] = seconds.get(target, 0.0) + entry["seconds"]
        failed[target] = failed.get(target, 0) + (not entry["ok"])
        latest[target] = entry
        peak[target] = max(peak.get(target, 0), entry.get("peak_rss_mb") or 0)
    print("| target | inputs | wall time (nice 19) | edges | corpus | peak RSS | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for target in sorted(runs):
        print(
            f"| {target} | {runs[target]:,} | {seconds[target] / 60:.0f} min "
            f"| {latest[target]['cov']} | {latest[target]['corpus']} "
            f"| {peak[target] or '?'} MB | {failed[target]} |"
        )
    print(
        f"| total | {sum(runs.values()):,} | {sum(seconds.values()) / 60:.0f} min | | | | "
        f"{sum(failed.values())} |"
    )
    return 0


def minimize(args: argparse.Namespace) -> int:
    """Add to the seed corpus the inputs of WORK that reach something new (-merge=1)."""
    for target in args.targets or TARGETS:
        with tempfile.TemporaryDirectory(prefix="patio-fuzz-merge-") as scratch:
            wrapper = Path(scratch) / "fuzz-target"
            wrapper.write_text(
                f'#!/bin/sh\nexec "{sys.executable}" -m tests.fuzz.child {target} "$@"\n'
            )
            wrapper.chmod(0o755)
            before = len(list((CORPUS / target).iterdir()))
            command = [
                sys.executable, "-m", "tests.fuzz.child", target, "-merge=1",
                f"-max_len={MAX_LEN[target]}", str(CORPUS / target), str(Path(args.work) / target),
            ]  # fmt: skip
            env = {**os.environ, "PATIO_FUZZ_ARGV0": str(wrapper)}
            proc = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            after = len(list((CORPUS / target).iterdir()))
            print(f"{target:18} {before} -> {after} inputs")
    return 0


def line_coverage(args: argparse.Namespace) -> int:
    """Replay every input of the corpora through its target under coverage.py.

    In a fresh interpreter, started by coverage, so that patio's import-time
    lines count as they would in a worker.
    """
    include = "patio/proto/*,patio/broker/serializer.py"
    with tempfile.TemporaryDirectory(prefix="patio-fuzz-cov-") as scratch:
        data = f"--data-file={scratch}/coverage"
        replay = ["-m", "tests.fuzz.replay", *([args.work] if args.work else [])]
        for command in (
            ["run", "--branch", f"--include={include}", data, *replay],
            ["report", data],
        ):
            argv = [sys.executable, "-m", "coverage", *command]
            proc = subprocess.run(argv, cwd=ROOT, check=False)
            if proc.returncode != 0:
                return proc.returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="fuzz targets")
    run_parser.add_argument("targets", nargs="*", help=f"default: all of {TARGETS}")
    run_parser.add_argument("--seconds", type=int, default=10, help="per target (default 10)")
    run_parser.add_argument("--runs", type=int, default=0, help="inputs per target, not seconds")
    run_parser.add_argument("--rss-mb", type=int, default=512, help="memory limit (default 512)")
    run_parser.add_argument("--timeout", type=int, default=10, help="seconds per input (10)")
    run_parser.add_argument("--work", help="keep new inputs and crashes here (default: temp)")
    run_parser.add_argument("--log", help="append one JSON line per target run to this file")
    sub.add_parser("seed", help="rewrite tests/fuzz/corpus from tests/fuzz/seeds.py")
    total_parser = sub.add_parser("total", help="sum the inputs run, from a --log file")
    total_parser.add_argument("log")
    minimize_parser = sub.add_parser("minimize", help="merge new inputs into the seed corpus")
    minimize_parser.add_argument("work", help="the --work folder of a run")
    minimize_parser.add_argument("targets", nargs="*", help=f"default: all of {TARGETS}")
    coverage_parser = sub.add_parser("coverage", help="line coverage of the corpora")
    coverage_parser.add_argument("--work", help="also replay the inputs found in this folder")
    args = parser.parse_args(argv)
    if args.command == "minimize":
        return minimize(args)
    if args.command == "coverage":
        return line_coverage(args)
    if args.command == "seed":
        write_seeds()
        return 0
    if args.command == "total":
        return total(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
