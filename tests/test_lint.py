"""`ruff check` (configured in pyproject.toml: pyflakes' errors, syntax errors, import order)
passes on the whole tree, so an unused import or an undefined name fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert "No module named ruff" not in proc.stderr, "ruff is missing: pip install -e '.[test]'"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]
