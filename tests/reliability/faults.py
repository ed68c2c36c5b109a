"""Fault injectors passed to the trainer as parameters (never patched in), and damaged checkpoints.

Ray pickles these by reference, so the workers import this module: `tests` is a package and Ray
puts the driver's working directory (the repository root under `python -m pytest`) on every
worker's sys.path. The 2-worker gradient test fails if a worker cannot import it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class InfGradient:
    """`before_backward` hook: on `rank`, at `step`, put an inf into the first element of the
    first trainable parameter's gradient (a tensor hook, so the engine sees it whatever its ZeRO
    stage does with `.grad` afterwards). Fires once per worker process: the skipped step is
    drawn again with the same step number and must then go through."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank
        self.fired = False

    def __call__(self, module: torch.nn.Module, step: int, rank: int) -> None:
        if self.fired or (step, rank) != (self.step, self.rank):
            return
        self.fired = True
        param = next(p for p in module.parameters() if p.requires_grad)
        handle = None

        def put_inf(grad: torch.Tensor) -> torch.Tensor:
            handle.remove()  # this one backward only
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        handle = param.register_hook(put_inf)
        print(f"[fault] rank {rank} step {step}: inf injected into a gradient", flush=True)


def fake_checkpoint(root: Path, step: int) -> Path:
    """A minimal complete checkpoint dir (state.json + two zip-format .pt shards) to damage in tests."""
    d = root / f"checkpoint_{step:08d}"
    (d / "ds").mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, d / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"m": torch.zeros(3)}, d / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (d / "state.json").write_text(json.dumps({"step": step, "epoch": 0, "batches_in_epoch": step, "world_size": 1}))
    return d
