#!/usr/bin/env bash
# The first command of the README: a local patio cluster running a demo workload.
#
#   bash scripts/run-local.sh [patio local options]   e.g. --calls 5000, --keep-running
#
# On a fresh machine it creates .venv (Python 3.11+) and installs patio with
# its worker extras (uvloop, prometheus-client) before running `patio local`.
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "run-local.sh: patio needs Python 3.11 or newer (tried: $PYTHON); set PYTHON=..." >&2
        exit 2
    fi
    echo "run-local.sh: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi

# Install (or refresh) patio into the venv only when something is missing, so
# a second run starts at once and works offline.
if ! .venv/bin/python -c 'import patio.cli, uvloop, prometheus_client' 2>/dev/null \
    || [ ! -x .venv/bin/patio ]; then
    echo "run-local.sh: installing patio with its worker extras into .venv" >&2
    log="$(mktemp)"
    # pip and setuptools are chatty even with --quiet; show their output only
    # when the install fails.
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
            && .venv/bin/python -m pip install --quiet -e '.[worker]'; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "run-local.sh: installing patio failed (output above)" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
fi

exec .venv/bin/patio local "$@"
