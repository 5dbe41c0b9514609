"""`python -m patio_operator`."""

from patio_operator import main

raise SystemExit(main())
