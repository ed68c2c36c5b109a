"""Where a run resumes from: the newest complete checkpoint of its run directory.

The same policy on local disk, NFS and object storage (`s3://`, `gs://`, through `pyarrow.fs`,
as Ray Train writes them): every `checkpoint_*` directory of the run is a candidate, newest step
first, including ones Ray's checkpoint manager never recorded (a driver killed between a worker
writing a checkpoint and the controller saving its state leaves such an orphan). A candidate cut
off mid-write (no `state.json`, an unreadable one, a truncated shard, or one not yet uploaded) is
skipped for the previous one. Shards are checked by opening them as zip archives: torch's format
keeps its index at the end of the file, so a cut-off file fails without unpickling anything, and
on object storage only the archive's tail is read (ranged reads), not the whole shard.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

STATE_FILE = "state.json"
CKPT_TAG = "ds"


def _path(fs: pafs.FileSystem, path: str | os.PathLike):
    return Path(path).resolve() if isinstance(fs, pafs.LocalFileSystem) else PurePosixPath(str(path))


def checkpoint_problem(ckpt_dir: str | os.PathLike, fs: pafs.FileSystem | None = None) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it looks complete.

    Complete means: `state.json` parses and names a step, and the DeepSpeed tag directory holds
    model states whose every `.pt` shard opens as a zip archive.

    Args:
        ckpt_dir: the checkpoint directory (a path inside `fs`).
        fs: its filesystem; local disk when None.
    """
    fs = fs or pafs.LocalFileSystem()
    root = str(ckpt_dir).rstrip("/")
    state_path = f"{root}/{STATE_FILE}"
    if fs.get_file_info(state_path).type != pafs.FileType.File:
        return f"no {STATE_FILE}"
    try:
        with fs.open_input_stream(state_path) as f:
            state = json.loads(f.read())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable ({type(err).__name__})"
    if not isinstance(state, dict) or not {"step", "epoch", "batches_in_epoch", "world_size"} <= set(state):
        return f"{STATE_FILE} lacks step/epoch/batches_in_epoch/world_size"
    listing = fs.get_file_info(pafs.FileSelector(f"{root}/{CKPT_TAG}", allow_not_found=True))
    shards = sorted(i.base_name for i in listing if i.type == pafs.FileType.File and i.base_name.endswith(".pt"))
    if not any(name.endswith("model_states.pt") for name in shards):
        return f"no DeepSpeed model states under {CKPT_TAG}/"
    for name in shards:
        try:
            with fs.open_input_file(f"{root}/{CKPT_TAG}/{name}") as f, zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile):
            return f"shard {CKPT_TAG}/{name} is truncated or corrupt"
    return None


def ckpt_order(path: PurePosixPath | Path) -> tuple[int, str]:
    """Sort key: the step in `checkpoint_<step>[-resume<k>]`, then the name."""
    digits = path.name.removeprefix("checkpoint_")[:8]
    return (int(digits) if digits.isdigit() else -1, path.name)


def resume_candidates(run_dir: str | os.PathLike, latest: str | os.PathLike | None = None,
                      fs: pafs.FileSystem | None = None) -> list:
    """Every `checkpoint_*` dir of the run plus `latest` (the checkpoint Ray reports, which may
    live beside them), newest step first; `-resume` generations of a step sort before the original.
    Paths inside `fs` (local disk when None): `Path` locally, `PurePosixPath` on object storage."""
    fs = fs or pafs.LocalFileSystem()
    latest = _path(fs, latest) if latest is not None else None
    folders = {_path(fs, run_dir)} | ({latest.parent} if latest is not None else set())
    found = set()
    for folder in folders:
        if fs.get_file_info(str(folder)).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(str(folder))):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
                found.add(_path(fs, info.path))
    if latest is not None:
        found.add(latest)
    return sorted(found, key=ckpt_order, reverse=True)


def pick_resume_dir(latest, run_dir: str, rank: int, all_true, fs: pafs.FileSystem | None = None) -> tuple:
    """The newest complete checkpoint to resume from; all ranks agree on the choice.

    Every rank inspects every shard of a candidate (not only its own), so ranks that share the
    storage reach the same verdict; `all_true(flag)` (a collective) makes that agreement explicit.

    Args:
        latest: the path (inside `fs`) of the checkpoint Ray offers, or None.
        run_dir: the run directory (inside `fs`).
        rank: this worker's rank (rank 0 logs).
        all_true: `flag -> bool`, true on every rank iff true on every rank.
        fs: the storage filesystem; local disk when None.

    Returns:
        (path inside `fs`, or None for "start from step 0"; suffix for the names of later
        checkpoints). The suffix is non-empty whenever the choice is not Ray's latest: the steps
        after it are saved again, and reusing the names of skipped checkpoints would let Ray's
        retention delete a directory it still lists.

    Raises:
        RuntimeError: Ray offers a checkpoint but no candidate is complete.
    """
    fs = fs or pafs.LocalFileSystem()
    latest = _path(fs, latest) if latest is not None else None
    candidates = resume_candidates(run_dir, latest, fs)
    suffix = f"-resume{len(candidates)}"
    for candidate in candidates:
        problem = checkpoint_problem(candidate, fs)
        if all_true(problem is None):
            if candidate == latest:
                return candidate, ""
            if rank == 0:
                why = "previous complete checkpoint" if latest is not None else "checkpoint found in the run directory"
                print(f"[train] resuming from the {why} {candidate.name}", flush=True)
            return candidate, suffix
        if rank == 0:
            print(f"[train] checkpoint {candidate} is unusable ({problem or 'incomplete on another rank'}); "
                  "trying the previous one", flush=True)
    if latest is None:
        if candidates and rank == 0:
            print(f"[train] no complete checkpoint under {run_dir} ({len(candidates)} incomplete); starting from step 0",
                  flush=True)
        return None, suffix if candidates else ""
    raise RuntimeError(f"no complete checkpoint under {latest.parent}: every checkpoint_* dir is "
                       f"incomplete; delete the run directory to start over")
