"""The workload ``patio local`` runs against the demo tasks (see tasks.py).

``calls(seed)`` yields ``(task, args)`` forever; the runner takes as many as
``--calls`` asks for (or as many as fit in ``--duration``). A fixed seed makes
two runs make the same calls, so their error counts can be compared.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

# Task name -> share of the calls.
MIX = {"mul": 0.40, "sha256": 0.20, "lookup": 0.25, "flaky": 0.15}

# Errors this workload provokes on purpose: they do not make `patio local` fail.
EXPECTED_ERRORS = {"flaky"}


def calls(seed: int = 42) -> Iterator[tuple[str, tuple[Any, ...]]]:
    rng = random.Random(seed)
    names = list(MIX)
    weights = [MIX[name] for name in names]
    while True:
        task = rng.choices(names, weights)[0]
        if task == "mul":
            yield task, (rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9))
        elif task == "sha256":
            yield task, (f"block-{rng.randint(0, 10**6)}", 500)
        elif task == "lookup":
            yield task, (f"user:{rng.randint(0, 9999)}", 2.0)
        else:
            yield task, (rng.randint(0, 999),)
