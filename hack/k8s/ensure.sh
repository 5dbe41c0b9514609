#!/usr/bin/env bash
# The single entry the test script calls before pytest: make sure the control
# plane binaries for tests/kube exist (build them on a cold cache, a no-op when
# warm) and print the folder they are in on the last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/build.sh" >&2
"$here/build.sh" --print-bin-dir
