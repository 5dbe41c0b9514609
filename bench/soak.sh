#!/usr/bin/env bash
# Soak: a local mesh of 6 patio workers under steady load while members are
# killed, restarted, added and removed every few seconds. Reports every 30 s;
# exit 0 when no retryable call was lost, none hung, and the stable members
# show no growth in RSS, fds or tasks after warm-up.
#   bash bench/soak.sh            # 30 minutes
#   bash bench/soak.sh 3          # 3 minutes (the suite runs this)
#   bash bench/soak.sh 30 --out soak.json --report-every 30
# Options: python -m bench.soak --help
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m bench.soak "$@"
