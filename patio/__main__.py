"""``python -m patio``: the same as the ``patio`` command."""

import sys

from patio.cli import main

if __name__ == "__main__":
    sys.exit(main())
