"""Run every corpus input through its target once: ``python -m tests.fuzz.replay [WORK]``.

What ``python -m tests.fuzz coverage`` runs under coverage.py. An input that
fails its target raises here, as it would under the fuzzer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.fuzz.seeds import CORPUS
from tests.fuzz.targets import TARGETS


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    counts = {}
    for target, function in TARGETS.items():
        folders = [CORPUS / target, *([work / target] if work else [])]
        files = [f for folder in folders if folder.is_dir() for f in sorted(folder.iterdir())]
        for path in files:
            function(path.read_bytes())
        counts[target] = len(files)
    print("inputs replayed:", counts)


if __name__ == "__main__":
    main()
