"""Profile one scenario's caller and executor with py-spy (where the CPU goes).

    python -m bench.profile tcp_c64 [--system ours] [--seconds 5] [--uvloop|--no-uvloop]

Starts the scenario's processes like the harness does, attaches
``py-spy record --format raw`` to each, then prints, per process, the
functions with the largest share of samples (self and inclusive) and the
raw collapsed stacks' path (bench/results/tmp/profile/). Needs py-spy in the
running interpreter's environment (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bench.envs import REPO, ceiling_env, original_env, ours_env
from bench.procs import Proc, ProcGroup, free_port
from bench.runner import PATIO_SCRIPT, RAW_SCRIPT, _cfg
from bench.scenarios import FULL, Scenario

OUT = REPO / "bench" / "results" / "tmp" / "profile"


def py_spy() -> str:
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: pip install py-spy")
    return found


def frame_name(frame: str) -> str:
    """'func (path/file.py:123)' -> 'file.py:func' (line numbers dropped)."""
    frame = frame.strip()
    if " (" in frame and frame.endswith(")"):
        func, where = frame[:-1].split(" (", 1)
        path = where.rsplit(":", 1)[0]
        parts = Path(path).parts
        if "patio" in parts:
            at = len(parts) - 1 - parts[::-1].index("patio")
            short = "/".join(parts[at:])
        else:
            short = parts[-1] if parts else path
        return f"{short}:{func}"
    return frame


def frame_line(frame: str) -> str:
    """'func (path/patio/x/y.py:123)' -> 'patio/x/y.py:123 func'."""
    name = frame_name(frame)
    line = frame.strip()[:-1].rsplit(":", 1)[-1] if frame.strip().endswith(")") else "?"
    path, _, func = name.rpartition(":")
    return f"{path}:{line} {func}"


def analyse(raw: Path, top: int) -> str:
    line_c: Counter[str] = Counter()
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        leaf = stack.split(";")[-1]
        if "patio/" in leaf:
            line_c[frame_line(leaf)] += count
        for name in set(frames):
            incl_c[name] += count
    if not total:
        return "  (no samples)\n"
    lines = [f"  {total} samples", "  self%  function (leaf frames)"]
    for name, c in self_c.most_common(top):
        lines.append(f"  {100 * c / total:5.1f}  {name}")
    lines.append("  incl%  function (anywhere on the stack), patio frames only")
    for name, c in incl_c.most_common():
        if name.startswith("patio/"):
            lines.append(f"  {100 * c / total:5.1f}  {name}")
            if len(lines) > 2 * top + 4:
                break
    lines.append("  self%  hottest patio lines")
    for name, c in line_c.most_common(top):
        lines.append(f"  {100 * c / total:5.1f}  {name}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("scenario")
    ap.add_argument("--system", default="ours", choices=("ours", "original", "ceiling"))
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="flood scenarios: live allocations by line in the caller (tracemalloc) "
        "while every call is pending, instead of py-spy",
    )
    args = ap.parse_args(argv)
    if args.memory:
        return memory_profile(args)
    known = {s.name: s for s in FULL}
    sc: Scenario = known[args.scenario]
    if sc.kind not in ("pair", "fanout", "flood"):
        raise SystemExit("profile supports caller/executor scenarios (pair, fanout, flood)")
    sc = replace(sc, count=10_000_000, max_seconds=args.seconds + 4.0)
    env = {"ours": ours_env, "original": original_env, "ceiling": ceiling_env}[args.system]()
    script = RAW_SCRIPT if args.system == "ceiling" else PATIO_SCRIPT
    use_uvloop = not args.no_uvloop
    OUT.mkdir(parents=True, exist_ok=True)
    spy = py_spy()
    tag = f"{sc.name}-{args.system}"
    with ProcGroup() as group:
        ports = [free_port() for _ in range(sc.executors)]
        servers = [
            group.add(
                Proc(
                    env,
                    script,
                    _cfg(sc, use_uvloop, role="server", port=p),
                    f"profile-{tag}-executor{i}",
                    OUT,
                )
            )
            for i, p in enumerate(ports)
        ]
        for srv in servers:
            srv.expect("ready", 60)
        client = group.add(
            Proc(
                env,
                script,
                _cfg(sc, use_uvloop, role="client", peers=ports),
                f"profile-{tag}-caller",
                OUT,
            )
        )
        time.sleep(1.5)  # past connect and warm-up
        targets = [("caller", client), *((f"executor{i}", s) for i, s in enumerate(servers))]
        spies = []
        for role, proc in targets:
            raw = OUT / f"{tag}-{role}.txt"
            spies.append(
                (
                    role,
                    raw,
                    subprocess.Popen(
                        [
                            spy,
                            "record",
                            "-p",
                            str(proc.pid),
                            "-d",
                            str(int(args.seconds)),
                            "-r",
                            str(args.rate),
                            "-f",
                            "raw",
                            "-o",
                            str(raw),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
        for _, _, sp in spies:
            sp.wait(timeout=args.seconds + 60)
        result = client.expect("result", args.seconds + 120)
        for srv in servers:
            srv.send("stop")
    print(
        f"{tag}: {result.get('calls_per_s', 0):,.0f} calls/s during profiling "
        f"(py-spy slows it down somewhat)"
    )
    for role, raw, _ in spies:
        print(f"\n== {role} ({raw})")
        print(analyse(raw, args.top) if raw.exists() else "  (no profile written)")
    return 0


def memory_profile(args: argparse.Namespace) -> int:
    sc = {s.name: s for s in FULL}[args.scenario]
    if sc.kind != "flood":
        raise SystemExit("--memory is for flood scenarios")
    env = {"ours": ours_env, "original": original_env, "ceiling": ceiling_env}[args.system]()
    script = RAW_SCRIPT if args.system == "ceiling" else PATIO_SCRIPT
    OUT.mkdir(parents=True, exist_ok=True)
    use_uvloop = not args.no_uvloop
    with ProcGroup() as group:
        port = free_port()
        srv = group.add(
            Proc(
                env,
                script,
                _cfg(sc, use_uvloop, role="server", port=port),
                f"memprofile-{args.system}-executor",
                OUT,
            )
        )
        srv.expect("ready", 60)
        client = group.add(
            Proc(
                env,
                script,
                _cfg(sc, use_uvloop, role="client", peers=[port], tracemalloc=True),
                f"memprofile-{args.system}-caller",
                OUT,
            )
        )
        result = client.expect("result", sc.max_seconds + 300)
        srv.send("stop")
    print(
        f"{sc.name} / {args.system}: {result.get('completed')}/{result.get('issued')} "
        f"completed, {result.get('errors')} errors ({result.get('first_error')}), "
        f"{result.get('elapsed_s', 0):.1f} s; caller peak RSS "
        f"{result.get('usage', {}).get('maxrss_mb')} MB "
        "(tracemalloc itself adds to it)"
    )
    print("  MB    bytes/call  where (live while all calls are pending)")
    for row in result.get("allocations", [])[: args.top]:
        print(f"  {row['mb']:6.1f} {row['bytes_per_call']:8.1f}  {row['where']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
