"""One libFuzzer process for one target: ``python -m tests.fuzz.child TARGET [libFuzzer flags]``.

Run it through ``python -m tests.fuzz``, which picks the corpus directories
and the limits. patio and the harness are instrumented for coverage (msgpack
is a C extension and is not); the first corpus directory given receives the
new inputs found.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["patio", "tests.fuzz"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    name = sys.argv[1]
    target = TARGETS[name]
    # libFuzzer starts argv[0] again for -merge=1: an executable that runs
    # this target (python -m tests.fuzz minimize writes one).
    argv0 = os.environ.get("PATIO_FUZZ_ARGV0", sys.argv[0])
    atheris.Setup([argv0, *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
