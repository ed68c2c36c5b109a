"""Checkpoints on object storage: an S3-compatible server on loopback (moto's server mode,
started here) stands in for s3://. The resume fall-back reads the run directory through
pyarrow.fs exactly as on local disk, and the file-writing CLIs refuse a URI in one line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.reliability.conftest import PY, REPO, smoke_args, subprocess_env
from tests.reliability.faults import fake_checkpoint

BUCKET = "ckpts"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(environment for s3:// clients, pyarrow S3 filesystem) of a fresh moto server on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # pyarrow's S3 client reads the endpoint from AWS_ENDPOINT_URL
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield env, fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def upload(fs, local: Path, remote: str) -> None:
    pafs.copy_files(str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_resume_falls_back_past_checkpoints_cut_off_mid_upload(s3, tmp_path, capsys):
    """Steps 2 (complete), 4 (no state.json: rank 0 uploads it last), 6 (a shard cut in half):
    resuming from s3:// picks step 2, as on local disk, whether or not Ray recorded step 6."""
    from core.paths import storage_fs
    from rayjobs.resume import checkpoint_problem, pick_resume_dir

    _, fs0 = s3
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_00000004" / "state.json").unlink()
    shard = tmp_path / "checkpoint_00000006" / "ds" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    upload(fs0, tmp_path, f"{BUCKET}/runs/cut")

    fs, run_dir = storage_fs(f"s3://{BUCKET}/runs/cut")
    assert isinstance(fs, pafs.S3FileSystem) and run_dir == f"{BUCKET}/runs/cut"
    assert checkpoint_problem(f"{run_dir}/checkpoint_00000002", fs) is None
    assert checkpoint_problem(f"{run_dir}/checkpoint_00000004", fs) == "no state.json"
    assert checkpoint_problem(f"{run_dir}/checkpoint_00000006", fs) == "shard ds/mp_rank_00_model_states.pt is truncated or corrupt"
    for latest in (f"{run_dir}/checkpoint_00000006", None):  # Ray's latest, or none recorded
        chosen, suffix = pick_resume_dir(latest, run_dir, 0, lambda flag: flag, fs)
        assert chosen.name == "checkpoint_00000002" and suffix == "-resume3"
    out = capsys.readouterr().out
    assert "checkpoint_00000006 is unusable (shard ds/mp_rank_00_model_states.pt is truncated or corrupt)" in out
    assert "checkpoint_00000004 is unusable (no state.json)" in out
    assert pick_resume_dir(None, f"{BUCKET}/runs/never-ran", 0, lambda flag: flag, fs) == (None, "")


@pytest.mark.parametrize("tool, argv, needle", [
    ("rayjobs.prepare_data", ["--corpus", "synthetic", "--out", "s3://b/data"], "--out s3://b/data: object storage is not supported"),
    ("rayjobs.evaluate", ["--untrained", "rayjobs/configs/smoke.yaml", "--data", "s3://b/data", "--out", "s3://b/m.json"],
     "--out s3://b/m.json: object storage is not supported"),
    ("rayjobs.leaderboard", ["--storage", "s3://b/runs"], "--storage s3://b/runs: object storage is not supported"),
    ("rayjobs.leaderboard", ["--storage", ".", "--out", "gs://b/lb"], "--out gs://b/lb: object storage is not supported"),
])
def test_file_writing_clis_refuse_uris_saying_what_to_do(tool, argv, needle, capsys):
    import importlib

    assert importlib.import_module(tool).main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert "aws s3 sync" in lines[0]


def _train(env: dict, storage: str, data: Path, name: str, *overrides) -> str:
    cmd = [PY, "-m", "rayjobs.train", *smoke_args(storage, data, name, *overrides)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


@pytest.mark.slow
def test_training_on_s3_resumes_past_checkpoints_cut_off_mid_upload(s3, rel_data):
    """A real 1-worker run with train.storage_path=s3://... writes checkpoints 2, 4, 6 there; 6 is
    cut (half a shard) and 4 lacks state.json; the rerun resumes from 2 and ends at step 8."""
    env_s3, fs = s3
    env = {**subprocess_env(), **env_s3}
    storage, name = f"s3://{BUCKET}/train", "s3-cut"
    run_dir = f"{BUCKET}/train/{name}"
    common = ["train.num_workers=1", "train.checkpoint_every=2", "train.keep_checkpoints=4"]
    _train(env, storage, rel_data, name, *common, "train.max_steps=6")
    saved = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(run_dir))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    assert saved == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"], saved
    before = _read_json(fs, f"{run_dir}/checkpoint_00000002/state.json")["history"]
    shards = [i for i in fs.get_file_info(pafs.FileSelector(f"{run_dir}/checkpoint_00000006/ds")) if i.path.endswith(".pt")]
    shard = max(shards, key=lambda i: i.size)
    with fs.open_input_stream(shard.path) as f:
        data = f.read()
    with fs.open_output_stream(shard.path) as f:
        f.write(data[: len(data) // 2])
    fs.delete_file(f"{run_dir}/checkpoint_00000004/state.json")

    out = _train(env, storage, rel_data, name, *common, "train.max_steps=8")
    assert re.search(r"checkpoint \S*checkpoint_00000006 is unusable \(shard ds/\S+ is truncated or corrupt\)", out), out[-3000:]
    assert re.search(r"checkpoint \S*checkpoint_00000004 is unusable \(no state.json\)", out), out[-3000:]
    assert "resumed from step 2" in out, out[-3000:]
    final = _read_json(fs, f"{run_dir}/final_metrics.json")
    state = _read_json(fs, f"{final['checkpoint']}/state.json")
    assert final["steps"] == 8 and [h["step"] for h in state["history"]] == list(range(1, 9))
    assert state["history"][:2] == before
    assert state["resumes"] == [{"step": 2, "checkpoint": "checkpoint_00000002"}]
    assert Path(final["checkpoint"]).name.startswith("checkpoint_00000008-resume")
