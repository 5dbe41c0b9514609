"""Draw bench/results/latest.png from the summaries (run as a script, so it can
use whichever interpreter has matplotlib): ``python chart.py DATA.json OUT.png``."""

from __future__ import annotations

import json
import sys
from typing import Any

SYSTEMS = (("ours", "#1f77b4"), ("original", "#ff7f0e"), ("ceiling", "#7f7f7f"))


def draw(data: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries: list[dict[str, Any]] = data["summaries"]
    scenarios = list(dict.fromkeys(s["scenario"] for s in summaries))
    idx = {(s["scenario"], s["system"]): s for s in summaries}
    panels = (
        ("calls_per_s", "calls/s (median, log scale; higher is better)"),
        ("p50_us", "p50 latency, µs (log scale; lower is better)"),
        ("rss", "peak RSS of the largest process, MB (lower is better)"),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9, 1.3 * len(scenarios) + 3), 11))
    width = 0.27
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, (system, color) in enumerate(SYSTEMS):
            xs, ys = [], []
            for j, sc in enumerate(scenarios):
                s = idx.get((sc, system))
                if not s:
                    continue
                if key == "rss":
                    rss = s.get("rss_max_mb") or {}
                    value = max(rss.values()) if rss else None
                else:
                    value = s.get(key)
                if value is None:
                    continue
                xs.append(j + (i - 1) * width)
                ys.append(value)
            ax.bar(xs, ys, width=width, color=color, label=system)
        if key != "rss":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(data.get("title", "patio benchmark"), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        draw(json.load(fh), sys.argv[2])
