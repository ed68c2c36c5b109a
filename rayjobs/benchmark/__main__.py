"""`python -m rayjobs.benchmark`: see the package docstring (rayjobs/benchmark/__init__.py)."""

import sys

from rayjobs.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
