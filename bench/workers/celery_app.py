"""The Celery app of the alternatives benchmark (Redis broker and backend)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-not-found]

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=64,
    broker_connection_retry_on_startup=True,
)


@app.task(name="echo")  # type: ignore[untyped-decorator]
def echo(value: Any) -> Any:
    return value
