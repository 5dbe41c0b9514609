"""``python -m bench [--quick] [--alternatives]`` — see docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.envs import (
    ORIGINAL_VERSION,
    REPO,
    cache_dir,
    ceiling_env,
    ensure_venv,
    original_env,
    ours_env,
)
from bench.runner import PATIO_SCRIPT, RAW_SCRIPT, System, probe, run_all
from bench.scenarios import select

DEFAULT_OUT = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny counts, 1 run, a few scenarios (< 60 s)",
    )
    ap.add_argument(
        "--alternatives",
        action="store_true",
        help="also measure Ray and Celery+Redis (not with --quick)",
    )
    ap.add_argument("--runs", type=int, default=None, help="runs per system (full: 3)")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names")
    ap.add_argument(
        "--systems",
        default="ours,original,ceiling",
        help="comma-separated subset of ours,original,ceiling",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default bench/results; quick: bench/results/tmp/quick)",
    )
    ap.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    ap.add_argument(
        "--ours-path",
        type=Path,
        default=None,
        metavar="DIR",
        help="measure the patio package in DIR (another checkout) as 'ours'",
    )
    ap.add_argument(
        "--ours-commit",
        default=None,
        metavar="REV",
        help="measure our package as committed at REV (exported with git archive)",
    )
    ap.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSONL",
        help="do not measure: redraw latest.md/png from a latest.jsonl",
    )
    ap.add_argument(
        "--update-docs",
        action="store_true",
        help="copy latest.md into docs/benchmarks.md (full runs)",
    )
    return ap.parse_args(argv)


def _git(*cmd: str) -> str:
    proc = subprocess.run(
        ["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def export_commit(rev: str) -> tuple[Path, str]:
    """``patio/`` as committed at ``rev``, extracted under the cache dir."""
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    if not sha:
        raise SystemExit(f"--ours-commit: unknown revision {rev!r}")
    dest = cache_dir() / f"bench-ours-{sha}"
    if not (dest / "patio").is_dir():
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha, "patio"],
            cwd=REPO,
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    return dest, sha


def git_state(commit: str | None = None) -> dict[str, Any]:
    """The commit our package was measured at, and whether patio/ had local edits."""
    if commit is not None:
        return {"head": commit, "patio_dirty": False, "exported": True}
    git = _git
    return {
        "head": git("rev-parse", "--short", "HEAD") or None,
        "patio_dirty": bool(git("status", "--porcelain", "--", "patio")),
    }


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def chart_python(log_file: Path) -> str:
    if importlib.util.find_spec("matplotlib") is not None:
        return sys.executable
    return str(ensure_venv("bench-venv-tools", ["matplotlib"], log=log_file))


def line_for(rec: dict[str, Any]) -> str:
    if rec.get("status") in ("unavailable", "error"):
        return (
            f"{rec['scenario']:<14} {rec['system']:<9} run {rec['run']}: {rec['status']}: "
            f"{str(rec.get('error'))[:200]}"
        )
    return (
        f"{rec['scenario']:<14} {rec['system']:<9} run {rec['run']}: "
        f"{rec.get('calls_per_s', 0):>10,.0f} calls/s  p50 {rec.get('p50_us') or 0:>8.0f} µs"
        f"  p99 {rec.get('p99_us') or 0:>8.0f} µs  {rec.get('completed')}/{rec.get('issued')}"
        f"  rss {rec.get('rss_mb')}"
    )


DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- latest:begin", "<!-- latest:end -->"


def update_docs(md: str) -> None:
    """Put ``md`` (headings moved two levels down) between the markers."""
    text = DOCS.read_text()
    start = text.index(BEGIN)
    start = text.index("\n", start) + 1
    end = text.index(END)
    body = "\n".join(
        "##" + line if line.startswith("#") else line for line in md.strip().splitlines()
    )
    DOCS.write_text(text[:start] + body + "\n" + text[end:])


def render(
    out: Path,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    extra: list[dict[str, Any]],
    titles: dict[str, str],
    tool_log: Path,
    update: bool,
) -> tuple[str, list[dict[str, Any]]]:
    """Summaries, ratios, targets; latest.md and latest.png. Returns the
    Markdown and the derived rows (for latest.jsonl)."""
    summaries = report.summarize(records)
    ratio_rows = report.ratios(summaries, records)
    target_rows = report.targets(summaries) if meta["mode"] != "quick" else []
    md = report.markdown(meta, summaries, ratio_rows, target_rows, titles)
    if extra:
        from bench import alternatives

        md += "\n" + alternatives.markdown(extra, summaries)
    (out / "latest.md").write_text(md)
    err = report.write_chart(
        summaries,
        out / "latest.png",
        f"patio benchmark ({meta['mode']}, {meta['loop_policy']}, {meta['started']})",
        chart_python(tool_log),
    )
    if err:
        log(f"chart failed: {err}")
    if update and meta["mode"] != "quick":
        update_docs(md)
    return md, [*summaries, *ratio_rows, *target_rows]


def report_only(jsonl: Path, out: Path, tool_log: Path, update: bool) -> int:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    meta = next(r for r in rows if r.get("type") == "meta")
    records = [r for r in rows if r.get("type") == "run"]
    extra = [r for r in rows if r.get("type") == "alternative"]
    titles = {s["name"]: s["title"] for s in meta.get("scenarios", [])}
    md, derived = render(out, meta, records, extra, titles, tool_log, update)
    # rows are all in memory: rewriting the same file is safe
    with open(out / "latest.jsonl", "w") as fh:
        for row in [meta, *records, *derived, *extra]:
            fh.write(json.dumps(row) + "\n")
    sys.stdout.write(md)
    return 0


def _terminate(signum: int, frame: object) -> None:
    # turn SIGTERM/SIGHUP into an exception so every ``finally`` stops its workers
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    args = parse_args(argv)
    if args.quick and args.alternatives:
        log("--alternatives is ignored in --quick mode")
        args.alternatives = False
    out: Path = args.out or (DEFAULT_OUT / "tmp" / "quick" if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    try:  # worker logs inside bench/results go to its git-ignored tmp/
        inside = out.resolve().relative_to(DEFAULT_OUT.resolve())
        log_dir = DEFAULT_OUT / "tmp" / "logs" / inside
    except ValueError:
        log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    setup_log = log_dir / "setup.log"
    if args.report_only is not None:
        return report_only(args.report_only, out, setup_log, args.update_docs)
    runs = args.runs or (1 if args.quick else 3)
    scenarios = select(args.quick, [s for s in args.scenarios.split(",") if s])
    wanted = [s for s in args.systems.split(",") if s]

    log(f"preparing interpreters (original patio venv under the cache dir; log {setup_log})")
    commit = None
    if args.ours_commit:
        args.ours_path, commit = export_commit(args.ours_commit)
        log(f"our package as committed at {commit}: {args.ours_path}")
    envs = {"ours": ours_env(args.ours_path), "ceiling": ceiling_env()}
    if "original" in wanted:
        envs["original"] = original_env(log=setup_log)
    caps = {name: probe(env) for name, env in envs.items()}
    use_uvloop = not args.no_uvloop and all(c.get("uvloop") for c in caps.values())
    serializers = {
        "ours": "msgpack (package default)",
        "original": "pickle (package default, RestrictedPickleSerializer)",
        "ceiling": "msgpack",
    }
    labels = {
        "ours": "our patio",
        "original": f"patio=={ORIGINAL_VERSION}",
        "ceiling": "raw asyncio+msgpack RPC",
    }
    systems = [
        System(
            name,
            labels[name],
            envs[name],
            RAW_SCRIPT if name == "ceiling" else PATIO_SCRIPT,
            serializers[name],
            caps[name],
        )
        for name in ("ours", "original", "ceiling")
        if name in wanted
    ]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta: dict[str, Any] = {
        "type": "meta",
        "mode": "quick" if args.quick else "full",
        "started": started,
        "runs": runs,
        "loop_policy": "uvloop" if use_uvloop else "asyncio",
        "serializers": serializers,
        "ours_version": caps.get("ours", {}).get("version"),
        "ours_git": git_state(commit) if commit or not args.ours_path else {},
        "ours_path": str(args.ours_path or REPO),
        "original_version": ORIGINAL_VERSION,
        "capabilities": caps,
        "python": {name: env.python for name, env in envs.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "scenarios": [s.__dict__ for s in scenarios],
        "order": "for each scenario, for each run, every system in turn (ABCABC...)",
    }
    log(f"loop policy {meta['loop_policy']}; ours caps {caps.get('ours')}")

    jsonl_tmp = out / "latest.jsonl.partial"
    with open(jsonl_tmp, "w") as sink_fh:
        sink_fh.write(json.dumps(meta) + "\n")

        def sink(rec: dict[str, Any]) -> None:
            sink_fh.write(json.dumps(rec) + "\n")
            sink_fh.flush()
            log(line_for(rec))

        records = run_all(systems, scenarios, runs, use_uvloop, log_dir, sink)
        extra: list[dict[str, Any]] = []
        if args.alternatives:
            from bench import alternatives

            extra = alternatives.run_alternatives(log_dir, use_uvloop, log)
        titles = {s.name: s.title for s in scenarios}
        md, derived = render(out, meta, records, extra, titles, setup_log, args.update_docs)
        for row in [*derived, *extra]:
            sink_fh.write(json.dumps(row) + "\n")
    jsonl_tmp.replace(out / "latest.jsonl")
    log(f"wrote {out / 'latest.jsonl'}, {out / 'latest.md'}, {out / 'latest.png'}")
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
