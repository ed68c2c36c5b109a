"""Headless Chromium for page tests (installed by `python -m rayjobs.fetch_assets --browser`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


requires_chromium = pytest.mark.skipif(chromium() is None,
                                       reason="chromium not installed: python -m rayjobs.fetch_assets --browser")


def screenshot(page: Path, png: Path, profile: Path, size: str = "1280,2000") -> subprocess.CompletedProcess:
    """Render `page` into `png` (a fresh profile directory each call: Chromium locks its profile)."""
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                           f"--window-size={size}", page.as_uri()], capture_output=True, text=True, timeout=120)


def dump_dom(page: Path, profile: Path, budget_ms: int | None = None) -> str:
    """The DOM after load (with `budget_ms`, after that much virtual time, so load handlers have run)."""
    extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
    return subprocess.run([chromium(), *FLAGS, *extra, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120).stdout
