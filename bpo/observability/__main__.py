"""``python -m bpo.observability [--check]``: write (or check) the generated dashboards and PrometheusRule."""

from __future__ import annotations

import sys

from bpo.observability.artifacts import main

if __name__ == "__main__":
    sys.exit(main())
