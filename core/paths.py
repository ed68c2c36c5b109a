"""Storage paths: a local path or a URI on shared storage (`s3://bucket/runs`, `gs://...`).

The one place that decides which is which. Data directories, run storage, checkpoints and sweep
directories may each be either; local paths are made absolute before they reach Ray (its
workers and Tune trials do not run in the driver's working directory), URIs pass unchanged.
Training checkpoints go wherever `train.storage_path` points (Ray Train writes through
`pyarrow.fs`, `storage_fs`). The command-line tools that write or walk plain files
(`prepare_data --out`, `evaluate --out`, `leaderboard --storage`) need a local or
shared-filesystem path and refuse a URI with `local_only`'s one line.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for a URI (`scheme://...`), False for a local path (and for None)."""
    return path is not None and "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (and normalised); a URI unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for local paths and URIs alike (URIs have no `Path` join)."""
    return "/".join([str(base).rstrip("/"), *names])


def storage_fs(location: str | os.PathLike):
    """(pyarrow filesystem, path inside it) of a local path or a URI; local paths come back absolute."""
    import pyarrow.fs as pafs

    if is_remote(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def local_only(option: str, value: str | os.PathLike, *, copy: str = "to") -> str | None:
    """None for a local path; for a URI, the one-line refusal saying what to do instead.

    Args:
        option: the command-line option, e.g. `--out`.
        value: its value.
        copy: `to` (the tool writes: write locally, then copy up) or `from` (it reads: copy down first).
    """
    if not is_remote(value):
        return None
    how = (f"write to a local or shared-filesystem path and copy it up afterwards (e.g. `aws s3 sync DIR {value}`)"
           if copy == "to" else f"copy it down first (e.g. `aws s3 sync {value} DIR`) and pass DIR")
    return f"{option} {value}: object storage is not supported here; {how}"
