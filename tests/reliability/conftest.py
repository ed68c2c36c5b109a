"""Shared pieces of the reliability suite: one prepared smoke corpus, smoke-run configs, and one
uninterrupted reference run that the fault and determinism tests compare against."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from core.config import load_run_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "rayjobs" / "configs" / "smoke.yaml"
# The fault-injection runs: 12 steps (smoke.yaml), a checkpoint every 3, one restart allowed.
FAULT_RUN = ["train.max_steps=12", "train.checkpoint_every=3", "train.max_failures=1", "train.keep_checkpoints=3"]


@pytest.fixture(scope="session")
def rel_data(smoke_data):
    """The prepared smoke corpus (tests/conftest.py `smoke_data`, shared with tests/rayjobs)."""
    return smoke_data


def smoke_cfg(storage: Path, data_dir: Path, name: str, *overrides):
    return load_run_config(SMOKE, [f"data.path={data_dir}", f"train.storage_path={storage}", f"train.name={name}",
                                   *overrides])


def smoke_args(storage: Path, data_dir: Path, name: str, *overrides) -> list[str]:
    """`python -m rayjobs.train` arguments of the same run."""
    sets = [f"data.path={data_dir}", f"train.storage_path={storage}", f"train.name={name}", *overrides]
    return ["--config", str(SMOKE), *[a for s in sets for a in ("--set", s)]]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return env


def saved_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "state.json").read_text())


@pytest.fixture(scope="session")
def reference_run(ray_local, rel_data, tmp_path_factory):
    """The uninterrupted fault-injection run (same config as the faulted ones)."""
    from rayjobs.train import run_training

    storage = tmp_path_factory.mktemp("ref-runs")
    return run_training(smoke_cfg(storage, rel_data, "reference", *FAULT_RUN))


PY = sys.executable
