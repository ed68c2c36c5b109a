"""Numerical safety: a non-finite loss never reaches the weights or a checkpoint, and the
temperature stays in [e^-max_log_scale, 1] whatever log_scale becomes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from core.config import LossConfig
from core.losses import pair_contrastive_loss
from tests.reliability.conftest import saved_state, smoke_cfg


def nan_on_calls(monkeypatch, calls: set[int]) -> list[int]:
    """Make `core.step.forward_pair_batch` return a NaN loss on the given (1-based) calls.
    Local mode (train.num_workers=0) runs the worker function in this process, so it sees this."""
    import core.step

    real = core.step.forward_pair_batch
    seen: list[int] = []

    def forward(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        seen.append(len(seen) + 1)
        if len(seen) in calls:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(core.step, "forward_pair_batch", forward)
    return seen


def all_saved_tensors_finite(checkpoint: Path) -> int:
    """Load every tensor of a checkpoint (DeepSpeed shards and the export); return how many."""
    from safetensors.torch import load_file

    n = 0

    def walk(obj):
        nonlocal n
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                n += 1
                assert torch.isfinite(obj).all(), f"non-finite tensor in {checkpoint}"
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for shard in Path(checkpoint).glob("ds/*.pt"):
        walk(torch.load(shard, map_location="cpu", weights_only=False))
    for weights in Path(checkpoint).glob("export/*.safetensors"):
        walk(load_file(str(weights)))
    return n


def local_cfg(tmp_path, data, name, *overrides):
    return smoke_cfg(tmp_path / "runs", data, name, "train.num_workers=0", "train.deepspeed=zero0",
                     "train.max_steps=4", "train.checkpoint_every=2", *overrides)


@pytest.mark.slow
def test_nan_loss_is_skipped_counted_and_never_saved(ray_local, rel_data, tmp_path, monkeypatch):
    from rayjobs.train import run_training

    calls = nan_on_calls(monkeypatch, {2, 3})
    final = run_training(local_cfg(tmp_path, rel_data, "nan-skip", "train.nan_policy=skip"))
    assert final["steps"] == 4 and len(calls) == 6  # 4 good steps need 6 batches
    assert final["skipped_nonfinite"] == 2
    state = saved_state(final["checkpoint"])
    assert state["skipped_nonfinite"] == 2
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in state["history"])
    kept = sorted(Path(final["run_dir"]).glob("checkpoint_*"))
    assert [saved_state(c)["step"] for c in kept] == [2, 4]  # local mode keeps them in the run dir
    for ckpt in kept:
        assert all_saved_tensors_finite(ckpt) > 0
    assert all_saved_tensors_finite(Path(final["checkpoint"])) > 0


@pytest.mark.slow
def test_nan_loss_with_stop_policy_fails_naming_the_step(ray_local, rel_data, tmp_path, monkeypatch):
    from rayjobs.train import run_training

    nan_on_calls(monkeypatch, {3})
    with pytest.raises(Exception, match=r"step 3: non-finite loss nan .*nan_policy=stop"):
        run_training(local_cfg(tmp_path, rel_data, "nan-stop", "train.nan_policy=stop"))
    # the checkpoint written before the NaN (step 2) is intact and finite; none comes after it
    saved = sorted((tmp_path / "runs" / "nan-stop").glob("checkpoint_*/state.json"))
    assert saved, "the step-2 checkpoint was not written"
    for state_file in saved:
        assert saved_state(state_file.parent)["step"] <= 2
        assert all_saved_tensors_finite(state_file.parent) > 0


@pytest.mark.slow
def test_inf_gradient_on_one_rank_is_skipped_by_all_counted_and_never_saved(ray_local, rel_data, tmp_path):
    """A 2-worker ZeRO-2 gloo run; rank 1 alone gets an inf in one gradient at step 2 (loss
    finite). Both ranks skip that step (a one-rank skip would hang the next collective), the
    run still makes its 4 steps, and every checkpoint holds only finite tensors. The injector is
    a parameter the workers import (tests.reliability.faults), not a patch."""
    from rayjobs.train import run_training
    from tests.reliability.faults import InfGradient

    cfg = smoke_cfg(tmp_path / "runs", rel_data, "inf-grad", "train.max_steps=4", "train.checkpoint_every=2",
                    "train.nan_policy=skip")
    final = run_training(cfg, before_backward=InfGradient(step=2, rank=1))
    assert final["steps"] == 4 and final["skipped_nonfinite"] == 1
    state = saved_state(final["checkpoint"])
    assert state["skipped_nonfinite"] == 1
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in state["history"])
    kept = sorted(p for p in Path(final["run_dir"]).glob("checkpoint_*") if (p / "state.json").exists())
    assert [saved_state(c)["step"] for c in kept] == [2, 4]
    for ckpt in kept:
        assert all_saved_tensors_finite(ckpt) > 0


@pytest.mark.parametrize("log_scale", [1e6, 88.0, 4.6052, -1e6, float("inf"), -float("inf")])
def test_extreme_log_scale_is_clamped_and_loss_stays_finite(log_scale):
    """tau is clamped to [0, max_log_scale] in the loss: logits are at most 100x cos-sims, so
    even tau = +-inf gives a finite loss and gradient."""
    torch.manual_seed(0)
    cfg = LossConfig()
    emb = torch.randn(8, 16, requires_grad=True)
    tau = torch.tensor([log_scale], requires_grad=True)
    loss = pair_contrastive_loss(emb, tau, torch.arange(8), max_log_scale=cfg.max_log_scale)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    clamped = min(max(log_scale, 0.0), cfg.max_log_scale)
    reference = pair_contrastive_loss(emb.detach(), torch.tensor([clamped]), torch.arange(8), max_log_scale=None)
    assert torch.allclose(loss.detach(), reference)


def test_reported_temperature_is_in_range():
    from core.step import compute_loss

    class Out:
        multimodal = torch.randn(8, 16)
        visual = torch.randn(8, 16)

    cfg = LossConfig()
    for log_scale in (1e6, -1e6, 3.0):
        _, metrics = compute_loss(Out(), torch.tensor([log_scale]), torch.arange(8), cfg)
        assert math.exp(-cfg.max_log_scale) - 1e-9 <= metrics["temperature"].item() <= 1.0
    assert math.isclose(metrics["temperature"].item(), math.exp(-3.0), rel_tol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("loss.temperature_init=50", "loss.temperature_init=50.0 is invalid"),
    ("loss.max_log_scale=0", "allowed a value in [0, 0.0]"),  # tau_init=3 no longer fits
    ("loss.max_log_scale=.nan", "a finite number"),
    ("train.lr=.inf", "train.lr=inf is invalid"),
])
def test_config_refuses_non_finite_or_out_of_range_numbers(override, message):
    from core.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [override])
