#!/usr/bin/env bash
# Run the patio benchmark: ours vs patio==0.1.4 vs a raw asyncio RPC ceiling.
#   bash bench/run.sh                  full run (3 interleaved runs per system)
#   bash bench/run.sh --quick          smoke test (< 60 s once the venvs are cached)
#   bash bench/run.sh --alternatives   also Ray and Celery+Redis
# Other flags: see `python -m bench --help`. Results: bench/results/latest.{jsonl,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    python3 -m venv .venv
    PY=.venv/bin/python
fi
if ! "$PY" -c 'import patio, msgpack, uvloop' >/dev/null 2>&1; then
    "$PY" -m pip install -q -e '.[uvloop]'
fi
exec "$PY" -m bench "$@"
