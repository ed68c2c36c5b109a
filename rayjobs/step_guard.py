"""The optimizer step, guarded: a non-finite gradient never reaches the weights.

A finite loss can still give an inf or NaN gradient (an overflow inside the backward pass, a bad
kernel). The worker calls `grads_finite` after `engine.backward` and before `engine.step`; every
rank gets the same answer, so either all ranks step or all skip (a step taken on some ranks only
would desynchronise the replicas and hang the next collective). `discard_step` then drops the
gradients without touching weights, optimizer state or the learning-rate schedule.

Where the gradients are, per DeepSpeed configuration (0.19):
    ZeRO-0 fp32    `p.grad` of the module (all-reduced in backward); the optimizer is plain torch
                   AdamW, which would step on an inf: the guard clears the grads and skips step()
    ZeRO-0 bf16    `p.grad` (BF16_Optimizer keeps the low-precision grads until its step)
    ZeRO-1/2       this rank's gradient partition; read by the optimizer's own overflow check
                   `has_overflow` (an all-reduce over the data-parallel group)
    ZeRO-3         likewise, over the partitioned flat gradient buffer
Every DeepSpeed optimizer above except plain AdamW already discards a step whose global gradient
norm is not finite (its `overflow` flag, the fp16 loss-scaler's path) and leaves the LR
scheduler alone; `discard_step` lets it, and checks that it did.

Imports neither ray nor deepspeed: it takes the engine as an argument.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_ranks_true(flag: bool, device) -> bool:
    """True on every rank iff `flag` is true on every rank (a collective: all ranks call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def _zero_optimizer(engine):
    """The engine's ZeRO optimizer when it partitions gradients or optimizer states, else None."""
    if engine.zero_optimization_stage() == 0:
        return None
    opt = engine.optimizer
    return opt if hasattr(opt, "has_overflow") else None


def local_grads_finite(engine) -> bool:
    """Whether the gradients `engine.step()` would apply are finite (this rank's view; under
    ZeRO the optimizer's check already all-reduces over the data-parallel group)."""
    opt = _zero_optimizer(engine)
    if opt is not None:
        if engine.zero_optimization_stage() == 3:
            return not opt.has_overflow()
        return not opt.has_overflow(partition_gradients=engine.zero_optimization_partition_gradients())
    return all(bool(torch.isfinite(p.grad).all()) for p in engine.module.parameters() if p.grad is not None)


def grads_finite(engine, device) -> bool:
    """True on every rank iff every rank's gradients are finite (a collective)."""
    return all_ranks_true(local_grads_finite(engine), device)


def discard_step(engine) -> None:
    """Drop this step's gradients; weights, optimizer state and LR schedule stay as they were.

    Raises:
        FloatingPointError: DeepSpeed applied the step anyway (a configuration whose optimizer
            does not check the gradient norm, e.g. `zero_optimization.compute_grad_norm=false`).
            Raised before any checkpoint could be written from the damaged weights.
    """
    if not hasattr(engine.optimizer, "overflow"):
        engine.zero_grad()  # plain torch optimizer: stepping would apply the inf; skip step()
        return
    lr_before = engine.get_lr()
    engine.step()  # DeepSpeed's overflow path: grads dropped, no update, scheduler not advanced
    if engine.was_step_applied() or engine.get_lr() != lr_before:
        raise FloatingPointError("DeepSpeed applied an optimizer step on non-finite gradients; this DeepSpeed "
                                 "config does not check the gradient norm (remove compute_grad_norm=false)")
