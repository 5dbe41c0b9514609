"""Fixtures of the worker tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import HERE, Spawner

# The test tasks module is imported in-process too (registry checks).
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        for worker in spawner.workers:
            worker.terminate()
        for worker in spawner.workers:
            worker.kill()
