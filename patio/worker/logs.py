"""Logging for the worker: plain lines for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from typing import TextIO

# Attributes every LogRecord has; anything else was passed with `extra=` and is
# worth keeping in a JSON line.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc, + extra fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RESERVED and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_utc(record.created)


def _iso_utc(created: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def setup_logging(level: str = "info", fmt: str = "plain", stream: TextIO | None = None) -> None:
    """Configure the root logger once for a worker process (replacing handlers)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Warnings become log lines (JSON ones too, with --log-format json). The
    # broker's empty-key warning is also logged by the broker itself: once is enough.
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=r"patio broker on .* uses an empty key")
