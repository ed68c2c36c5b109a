"""core.paths: which storage paths are URIs, absolute local paths, joins."""

from __future__ import annotations

import os
from pathlib import Path

from core.paths import absolute, is_remote, join


def test_is_remote_only_for_uris():
    assert is_remote("s3://bucket/runs") and is_remote("gs://b/x") and is_remote("file:///tmp/x")
    assert not is_remote("runs/data") and not is_remote("/mnt/efs/runs") and not is_remote(Path("/tmp"))
    assert not is_remote(None)


def test_absolute_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute(Path("runs")) == str(tmp_path / "runs")
    assert absolute("/a/b/../c/") == "/a/c"
    assert absolute("s3://bucket/a/../b") == "s3://bucket/a/../b"
    assert os.path.isabs(absolute("."))


def test_join_local_and_uri():
    assert join("s3://bucket/runs/", "sweep", "runs") == "s3://bucket/runs/sweep/runs"
    assert join("/mnt/runs", "sweep") == str(Path("/mnt/runs") / "sweep")
    assert join("/", "x") == "/x"
