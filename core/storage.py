"""Local paths and object-storage URIs (`s3://`, `gs://`): which is which, and their pyarrow filesystem.

Training checkpoints go wherever `train.storage_path` points (Ray Train writes through
`pyarrow.fs`). The command-line tools that write or walk plain files (`prepare_data --out`,
`evaluate --out`, `leaderboard --storage`) need a local or shared-filesystem path and refuse a
URI with `local_only`'s one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI such as `s3://bucket/runs`; False for a local or NFS path."""
    return "://" in str(path)


def storage_fs(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI; local paths come back absolute."""
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
