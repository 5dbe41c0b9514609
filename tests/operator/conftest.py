"""Make `patio_operator` (and this folder's helpers) importable without installing.

`operator/` is deliberately not a package (a top-level `operator` package
would shadow the standard library), so its source folder is put on sys.path
here; an editable install (`pip install -e .`) works just as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "operator" / "src"
# No __init__.py in tests/operator on purpose: as a package it would be
# imported as `operator`, shadowing the standard library module.
for folder in (SRC, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


_ROOT = HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
