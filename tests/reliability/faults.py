"""Fault injectors passed to the trainer as parameters (never patched in), and damaged checkpoints.

Ray pickles these by reference, so the workers import this module: `tests` is a package and Ray
puts the driver's working directory (the repository root under `python -m pytest`) on every
worker's sys.path. The 2-worker gradient test fails if a worker cannot import it.
"""

from __future__ import annotations

import json
import time
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


class HoldForPreemption:
    """`before_backward` hook of the spot-preemption test, driven by flag files in `flags`.

    Before step `notice_step` every rank writes `waiting.rank<r>` and waits for `drained` (the
    test drains the node the workers sit on), then gives Ray Train's drain poll time to tell the
    workers; after that step the run takes its just-in-time checkpoint. Before the next step it
    waits for `node_gone`, so the run cannot finish on the draining node: it is still there when
    the test kills the node. A resumed attempt finds both flags and never waits."""

    def __init__(self, flags: str, notice_step: int, notice_delay_s: float = 2.0, timeout_s: float = 300.0):
        self.flags, self.notice_step = Path(flags), notice_step
        self.notice_delay_s, self.timeout_s = notice_delay_s, timeout_s

    def _wait(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not (self.flags / name).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"HoldForPreemption: no {self.flags / name} after {self.timeout_s:.0f}s")
            time.sleep(0.1)

    def __call__(self, module: torch.nn.Module, step: int, rank: int) -> None:
        if step == self.notice_step and not (self.flags / "drained").exists():
            (self.flags / f"waiting.rank{rank}").touch()
            self._wait("drained")
            time.sleep(self.notice_delay_s)
        elif step == self.notice_step + 1:
            self._wait("node_gone")


def fake_checkpoint(root: Path, step: int) -> Path:
    """A minimal complete checkpoint dir (state.json + two zip-format .pt shards) to damage in tests."""
    d = root / f"checkpoint_{step:08d}"
    (d / "ds").mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, d / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"m": torch.zeros(3)}, d / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (d / "state.json").write_text(json.dumps({"step": step, "epoch": 0, "batches_in_epoch": step, "world_size": 1}))
    return d
