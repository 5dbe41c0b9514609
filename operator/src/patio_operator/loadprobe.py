"""Sampling the workers' executor load from their /metrics, for the autoscaler.

The fetch is the key probe's (`keyprobe.fetch_metrics` under
`keyprobe.probe_all`): one plain GET with a total deadline, a size cap, no
redirects, all of a cluster's pods at once and back by one deadline, because
the pods answering are tenant code. Only the parsing is the autoscaler's
(`autoscale.parse_load`). A worker that does not answer is left out.
"""

from __future__ import annotations

from collections.abc import Iterable

from patio_operator import keyprobe
from patio_operator.autoscale import Load, parse_load


def sample(targets: Iterable[tuple[str, str]], port: int) -> dict[str, Load]:
    """{pod name: load} for (pod name, ip) pairs."""
    texts = keyprobe.probe_all({name: (ip, port) for name, ip in targets}, keyprobe.fetch_metrics)
    loads = {name: parse_load(text) for name, text in texts.items() if text is not None}
    return {name: load for name, load in loads.items() if load is not None}
