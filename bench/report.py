"""Summaries (medians), ratios, targets, the Markdown table and the chart."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

SYSTEMS = ("ours", "original", "ceiling")


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per system x scenario (medians over runs)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[tuple[str, str]] = []
    for rec in records:
        if rec.get("type") != "run":
            continue
        key = (rec["scenario"], rec["system"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(rec)
    out: list[dict[str, Any]] = []
    for scenario, system in order:
        recs = groups[(scenario, system)]
        good = [r for r in recs if r.get("status") in ("ok", "incomplete")]
        rss_roles: dict[str, float] = {}
        for r in good:
            for role, mb in (r.get("rss_mb") or {}).items():
                if mb is not None:
                    rss_roles[role] = max(rss_roles.get(role, 0.0), float(mb))
        summary: dict[str, Any] = {
            "type": "summary",
            "scenario": scenario,
            "system": system,
            "runs": len(recs),
            "runs_measured": len(good),
            "status": (
                "ok"
                if good and all(r.get("ok") for r in recs)
                else (recs[0].get("status") if not good else "incomplete")
            ),
            "calls_per_s": _median([r.get("calls_per_s") for r in good]),
            "p50_us": _median([r.get("p50_us") for r in good]),
            "p99_us": _median([r.get("p99_us") for r in good]),
            "cpu_us_per_call": _median([r.get("cpu_us_per_call") for r in good]),
            "remote_calls_per_s": _median([r.get("remote_calls_per_s") for r in good]),
            "local_calls_per_s": _median([r.get("local_calls_per_s") for r in good]),
            "remote_share": _median([r.get("remote_share") for r in good]),
            "rss_max_mb": rss_roles,
            "all_completed": bool(good) and all(r.get("all_completed") for r in good),
            "completed": sum(int(r.get("completed") or 0) for r in good),
            "issued": sum(int(r.get("issued") or 0) for r in good),
            "serializer": recs[0].get("serializer"),
            "loop_policy": recs[0].get("loop_policy"),
        }
        errors = [
            r.get("error") or r.get("first_error")
            for r in recs
            if r.get("error") or r.get("first_error")
        ]
        if errors:
            summary["error"] = errors[0]
        if good and good[0].get("mesh_arrangement"):
            summary["mesh_arrangement"] = good[0]["mesh_arrangement"]
        if good and good[0].get("elapsed_s") is not None:
            summary["elapsed_s"] = _median([r.get("elapsed_s") for r in good])
        out.append(summary)
    return out


def _index(summaries: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["scenario"], s["system"]): s for s in summaries}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _paired(
    records: list[dict[str, Any]], scenario: str, a: str, b: str, key: str = "calls_per_s"
) -> float | None:
    """Median over runs of the ratio a/b within the same run (same conditions)."""
    by_run: dict[int, dict[str, float]] = {}
    for r in records:
        if (
            r.get("type") == "run"
            and r["scenario"] == scenario
            and r.get(key) is not None
            and r.get("status") == "ok"
        ):
            by_run.setdefault(int(r["run"]), {})[r["system"]] = float(r[key])
    vals = [v[a] / v[b] for v in by_run.values() if a in v and b in v and v[b]]
    return statistics.median(vals) if vals else None


def ratios(
    summaries: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    idx = _index(summaries)
    records = records or []
    scenarios = list(dict.fromkeys(s["scenario"] for s in summaries))
    out = []
    for sc in scenarios:
        ours = idx.get((sc, "ours"), {})
        orig = idx.get((sc, "original"), {})
        ceil = idx.get((sc, "ceiling"), {})
        out.append(
            {
                "type": "ratio",
                "scenario": sc,
                "ours_over_original": _ratio(ours.get("calls_per_s"), orig.get("calls_per_s")),
                "ours_over_ceiling": _ratio(ours.get("calls_per_s"), ceil.get("calls_per_s")),
                "p50_ours_over_ceiling": _ratio(ours.get("p50_us"), ceil.get("p50_us")),
                "paired_ours_over_original": _paired(records, sc, "ours", "original"),
                "paired_ours_over_ceiling": _paired(records, sc, "ours", "ceiling"),
            }
        )
    return out


def _target(
    name: str, met: bool | None, value: str, threshold: str, reference: str = ""
) -> dict[str, Any]:
    return {
        "type": "target",
        "name": name,
        "met": met,
        "value": value,
        "threshold": threshold,
        "reference": reference,
    }


def _fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def targets(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on our package's medians."""
    idx = _index(summaries)

    def get(sc: str, system: str, key: str) -> Any:
        return idx.get((sc, system), {}).get(key)

    out: list[dict[str, Any]] = []
    for sc in ("tcp_c64", "tcp_c1024", "tcp_64k_c64", "fanout2_c256"):
        if (sc, "ours") not in idx:
            continue
        r_orig = _ratio(get(sc, "ours", "calls_per_s"), get(sc, "original", "calls_per_s"))
        r_ceil = _ratio(get(sc, "ours", "calls_per_s"), get(sc, "ceiling", "calls_per_s"))
        c_orig = _ratio(get(sc, "ceiling", "calls_per_s"), get(sc, "original", "calls_per_s"))
        if sc in ("tcp_c64", "tcp_c1024"):
            out.append(
                _target(
                    f"{sc}: throughput >= 3x original",
                    None if r_orig is None else r_orig >= 3.0,
                    _fmt_x(r_orig),
                    ">= 3x",
                    f"ceiling/original {_fmt_x(c_orig)}",
                )
            )
        out.append(
            _target(
                f"{sc}: throughput >= 60% of ceiling",
                None if r_ceil is None else r_ceil >= 0.60,
                "n/a" if r_ceil is None else f"{r_ceil * 100:.0f}%",
                ">= 60%",
            )
        )
    if ("tcp_c1", "ours") in idx:
        r = _ratio(get("tcp_c1", "ours", "p50_us"), get("tcp_c1", "ceiling", "p50_us"))
        out.append(
            _target(
                "tcp_c1: p50 latency <= 1.5x ceiling's",
                None if r is None else r <= 1.5,
                _fmt_x(r),
                "<= 1.5x",
            )
        )
    for sc in ("tcp_c64", "tcp_c1024"):
        cpu = get(sc, "ours", "cpu_us_per_call")
        if cpu is not None:
            out.append(
                _target(
                    f"{sc}: CPU per call, caller + executor <= 8 µs",
                    cpu <= 8.0,
                    f"{cpu:.1f} µs",
                    "<= 8 µs",
                    f"ceiling {_num(get(sc, 'ceiling', 'cpu_us_per_call'))} µs",
                )
            )
    flood = next(
        (s for s in summaries if s["system"] == "ours" and s["scenario"].startswith("flood")), None
    )
    if flood is not None:
        rss = flood.get("rss_max_mb") or {}
        caller, executor = rss.get("caller"), rss.get("executor")
        met = (
            flood.get("all_completed")
            and caller is not None
            and executor is not None
            and caller < 150
            and executor < 150
        )
        out.append(
            _target(
                f"{flood['scenario']}: all calls complete, caller and executor < 150 MB RSS",
                bool(met) if flood.get("runs_measured") else None,
                f"{flood.get('completed')}/{flood.get('issued')} completed, caller "
                f"{caller} MB, executor {executor} MB",
                "all; < 150 MB each",
                "ceiling: caller {c} MB, executor {e} MB".format(
                    c=(idx.get((flood["scenario"], "ceiling"), {}).get("rss_max_mb") or {}).get(
                        "caller"
                    ),
                    e=(idx.get((flood["scenario"], "ceiling"), {}).get("rss_max_mb") or {}).get(
                        "executor"
                    ),
                ),
            )
        )
    # mesh4_c64 is not a target: its members (rightly) run their own calls
    # themselves, which measures the executor, not the mesh.
    for mesh in ("mesh4_remote_c64",):
        if (mesh, "ours") not in idx:
            continue
        # Remote execution only: calls a member runs itself do not cross the network.
        key = "remote_calls_per_s"
        r = _ratio(get(mesh, "ours", key), get("tcp_c64", "ours", "calls_per_s"))
        c = _ratio(get(mesh, "ceiling", key), get("tcp_c64", "ceiling", "calls_per_s"))
        out.append(
            _target(
                f"{mesh}: remote executions/s >= 1.5x a single pair (tcp_c64)",
                None if r is None else r >= 1.5,
                _fmt_x(r),
                ">= 1.5x",
                f"ceiling's mesh/pair {_fmt_x(c)}",
            )
        )
    return out


def _both(r: dict[str, Any], other: str) -> str:
    text = _fmt_x(r.get(f"ours_over_{other}"))
    paired = r.get(f"paired_ours_over_{other}")
    if paired is not None:
        text += f" ({paired:.2f}x)"
    return text


def _git(meta: dict[str, Any]) -> str:
    state = meta.get("ours_git") or {}
    if not state.get("head"):
        return f"{meta.get('ours_path')} (not a known commit)"
    dirty = " (with uncommitted changes in patio/)" if state.get("patio_dirty") else ""
    return f"commit {state['head']}{dirty}"


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.1f}{unit}"


def _lat(s: dict[str, Any] | None) -> str:
    if not s or s.get("p50_us") is None:
        return "—"
    return f"{_num(s['p50_us'])}/{_num(s['p99_us'])}"


def _rss(s: dict[str, Any] | None) -> str:
    if not s or not s.get("rss_max_mb"):
        return "—"
    return ", ".join(f"{k} {v:.0f}" for k, v in s["rss_max_mb"].items())


def _cell(s: dict[str, Any] | None) -> str:
    if not s:
        return "—"
    if s.get("calls_per_s") is None:
        return str(s.get("status"))
    text = _num(s["calls_per_s"])
    if not s.get("all_completed"):
        text += " (incomplete)"
    return text


def markdown(
    meta: dict[str, Any],
    summaries: list[dict[str, Any]],
    ratio_rows: list[dict[str, Any]],
    target_rows: list[dict[str, Any]],
    titles: dict[str, str],
) -> str:
    idx = _index(summaries)
    lines = [
        f"# patio benchmark — {meta.get('mode')} run, {meta.get('started')}",
        "",
        f"Loop policy: **{meta.get('loop_policy')}** for all systems. "
        f"Serializers (each package's default): ours **{meta['serializers']['ours']}**, "
        f"original **{meta['serializers']['original']}**, "
        f"ceiling **{meta['serializers']['ceiling']}**. "
        f"Runs per system: {meta.get('runs')} (interleaved ABCABC…; medians shown). "
        f"Our patio: {meta.get('ours_version')} at {_git(meta)}; "
        f"original: patio=={meta.get('original_version')}. "
        f"Machine: {meta['machine']['cpus']} CPUs, load average at start "
        f"{meta['machine']['loadavg_at_start']} (other work on the machine adds noise; "
        "each record in latest.jsonl has the 1-minute load average before it).",
        "",
        "calls/s are medians; p50/p99 are per-call latencies in µs (ours / original / ceiling); "
        "RSS is the peak RSS (MB) of each process, max over runs; CPU is µs of CPU per call, "
        "caller + executor(s). Ratios are of the medians; in parentheses, the median of the "
        "per-run ratios (each run's systems ran back to back, under the same conditions).",
        "",
        "| scenario | ours | original | ceiling | ours/original | ours/ceiling "
        "| p50/p99 µs (ours; orig; ceil) | RSS MB (ours; orig; ceil) "
        "| CPU µs/call (ours; orig; ceil) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    rmap = {r["scenario"]: r for r in ratio_rows}
    for sc in dict.fromkeys(s["scenario"] for s in summaries):
        o, g, c = idx.get((sc, "ours")), idx.get((sc, "original")), idx.get((sc, "ceiling"))
        r = rmap.get(sc, {})
        cpu = "; ".join(_num(x.get("cpu_us_per_call")) if x else "—" for x in (o, g, c))
        lines.append(
            f"| {sc} | {_cell(o)} | {_cell(g)} | {_cell(c)} "
            f"| {_both(r, 'original')} | {_both(r, 'ceiling')} "
            f"| {_lat(o)}; {_lat(g)}; {_lat(c)} | {_rss(o)}; {_rss(g)}; {_rss(c)} | {cpu} |"
        )
    meshes = [
        sc
        for sc in dict.fromkeys(s["scenario"] for s in summaries)
        if any(idx.get((sc, sy), {}).get("remote_calls_per_s") is not None for sy in SYSTEMS)
    ]
    if meshes:
        lines += [
            "",
            "Mesh scenarios, local and remote execution apart (a member may run its own "
            "calls without the network; original and ceiling send every call to another "
            "process). Remote: calls/s executed by another process than the caller's; "
            "local: calls/s a member ran for itself.",
            "",
            "| scenario | remote calls/s (ours; orig; ceil) | local calls/s (ours) "
            "| remote share (ours) | ours/ceiling, remote only |",
            "|---|---|---:|---:|---:|",
        ]
        for sc in meshes:
            o, g, c = (idx.get((sc, sy)) or {} for sy in SYSTEMS)
            remote = "; ".join(_num(x.get("remote_calls_per_s")) for x in (o, g, c))
            share = o.get("remote_share")
            lines.append(
                f"| {sc} | {remote} | {_num(o.get('local_calls_per_s'))} "
                f"| {'—' if share is None else f'{share * 100:.0f}%'} "
                f"| {_fmt_x(_ratio(o.get('remote_calls_per_s'), c.get('remote_calls_per_s')))} |"
            )
    lines += ["", "Scenarios:", ""]
    for sc in dict.fromkeys(s["scenario"] for s in summaries):
        lines.append(f"- `{sc}`: {titles.get(sc, sc)}")
    arrangements = {
        s["system"]: s["mesh_arrangement"] for s in summaries if s.get("mesh_arrangement")
    }
    for system, how in arrangements.items():
        lines.append(f"- mesh arrangement ({system}): {how}")
    problems = [s for s in summaries if s.get("status") != "ok"]
    if problems:
        lines += ["", "Not measured / problems:", ""]
        for s in problems:
            lines.append(
                f"- {s['scenario']} / {s['system']}: {s['status']}: {str(s.get('error', ''))[:300]}"
            )
    if target_rows:
        lines += [
            "",
            "## Targets (our package)",
            "",
            "| target | value | threshold | met | for reference, same run |",
            "|---|---|---|---|---|",
        ]
        for t in target_rows:
            met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            lines.append(
                f"| {t['name']} | {t['value']} | {t['threshold']} | {met} "
                f"| {t.get('reference', '')} |"
            )
    lines.append("")
    return "\n".join(lines)


def write_chart(
    summaries: list[dict[str, Any]], path: Path, title: str, tool_python: str | None = None
) -> str | None:
    """Render the PNG with matplotlib (here, or in a tools venv). Returns an
    error text, or None on success."""
    payload = json.dumps({"summaries": summaries, "title": title})
    data_path = path.with_suffix(".chart.json")
    data_path.write_text(payload)
    script = Path(__file__).resolve().parent / "chart.py"
    python = tool_python or sys.executable
    try:
        proc = subprocess.run(
            [python, str(script), str(data_path), str(path)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        data_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        return proc.stderr[-1000:]
    return None
