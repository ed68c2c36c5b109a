"""Storage paths: a local path or a URI on shared storage (`s3://bucket/runs`, `gs://...`).

The one place that decides which is which. Data directories, run storage, checkpoints and sweep
directories may each be either; local paths are made absolute before they reach Ray (its
workers and Tune trials do not run in the driver's working directory), URIs pass unchanged.
"""

from __future__ import annotations

import os


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for a URI (`scheme://...`), False for a local path (and for None)."""
    return path is not None and "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (and normalised); a URI unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for local paths and URIs alike (URIs have no `Path` join)."""
    return "/".join([str(base).rstrip("/"), *names])
