#!/usr/bin/env bash
# The whole test suite, from a fresh machine: system packages, virtualenv,
# the Kubernetes test control plane, lint, type check, tests.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -k mesh      # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$1" "$(( $(date +%s) - started ))"; }

step "system packages"
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || need+=(golang-go)
# The partition tests put members in network namespaces (ip) and cut links (iptables).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The container image (hack/image), the containers and the real node (hack/node).
for tool_pkg in mmdebstrap:mmdebstrap buildah:buildah runc:runc iptables:iptables \
    conntrack:conntrack nft:nftables; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need+=("${tool_pkg#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package may start a system Prometheus; the tests start their own
# (on free ports) and need none. Stop only that service, never another run's.
if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus 2>/dev/null || true; fi
pkill -xf /usr/bin/prometheus 2>/dev/null || true
export PATH="/usr/local/go/bin:$PATH"

step "virtualenv"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,worker,kubernetes]"

step "Kubernetes test control plane (built from Go modules, cached in ~/.cache/patio)"
bash hack/k8s/ensure.sh

step "container image from ./Dockerfile (Debian base, buildah; cached in ~/.cache/patio)"
bash hack/image/build.sh

step "real node: containerd, CNI, crictl, kubelet, kube-proxy, CoreDNS, pause (cached in ~/.cache/patio)"
bash hack/node/build.sh

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy"
.venv/bin/mypy
# The 3.12+ branches (eager served calls) are type-checked too (about 12 s).
.venv/bin/mypy --python-version 3.13
step "import layers"
.venv/bin/lint-imports

step "pytest"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ $status -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    status=1
fi
# Served calls start eagerly on Python 3.12+ (patio/broker/tcp/server.py):
# the broker's core tests run on 3.13 too, with the whole suite only (about a
# minute; a venv cached in ~/.cache/patio). The interpreter: $PYTHON313,
# python3.13 on PATH, or pyenv's.
if [ $# -eq 0 ]; then
    step "broker core tests on Python 3.13"
    py313=${PYTHON313:-}
    for candidate in python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python; do
        # (a pyenv shim exists even where it cannot run 3.13: try it)
        [ -z "$py313" ] && "$candidate" -c '' 2>/dev/null && py313=$candidate
    done
    if [ -z "$py313" ]; then
        # Not a failure: the machine's own Python (3.11) is the one the suite
        # is for; this run only adds the 3.12+ path where an interpreter exists.
        echo "WARNING: no Python 3.13 found (set PYTHON313): the 3.12+ path of served calls is NOT tested" >&2
    else
        venv313=${PATIO_CACHE_DIR:-$HOME/.cache/patio}/venv-py313
        want="$("$py313" --version) msgpack uvloop pytest pytest-asyncio pytest-timeout trustme cryptography hypothesis PyYAML prometheus-client"
        if [ "$(cat "$venv313/.installed" 2>/dev/null)" != "$want" ]; then
            rm -rf "$venv313"
            "$py313" -m venv "$venv313"
            "$venv313/bin/pip" install -q --disable-pip-version-check ${want#* * }
            echo "$want" >"$venv313/.installed"
        fi
        set +e
        PYTHONPATH="$root" "$venv313/bin/python" -m pytest -p no:cacheprovider -q \
            tests/test_tcp_broker.py tests/test_mesh.py tests/test_loop_fairness.py \
            tests/test_deadlines.py tests/test_compat_014.py tests/test_executors.py \
            tests/test_proto.py tests/test_limits.py tests/test_peer_memory.py \
            tests/test_bad_input.py
        status313=$?
        set -e
        [ $status313 -eq 0 ] || status=$status313
    fi
fi
step "done (pytest exit $status)"
# A process of this checkout's virtualenv that outlived the run and lost its
# parent was left behind by a test.
# (Helpers such as multiprocessing's resource tracker exit just after pytest:
# give them two seconds, and ignore zombies.)
sleep 2
leftover=$(ps -eo pid=,ppid=,stat=,args= \
    | awk -v venv="$root/.venv/bin/" '$2 == 1 && $3 !~ /^Z/ && index($0, venv) { print $1 }')
if [ -n "$leftover" ]; then
    echo "processes left behind by the tests:" >&2
    ps -o pid,args -p $leftover >&2 || true
    status=1
fi
exit $status
