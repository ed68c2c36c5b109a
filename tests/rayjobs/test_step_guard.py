"""rayjobs.step_guard on real DeepSpeed engines (one process, gloo world of 1, CPU, seconds):
an inf gradient behind a finite loss is seen before the step, and discarding the step leaves
weights, optimizer state and LR schedule exactly as if the bad batch had never been drawn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools
from rayjobs.step_guard import discard_step, grads_finite, local_grads_finite
from rayjobs.train_worker import _init_process_group_if_local


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    created = not dist.is_initialized()
    _init_process_group_if_local(use_gpu=False)
    yield
    if created:
        dist.destroy_process_group()


def make_engine(zero: str):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ds = load_deepspeed_config(zero, micro_batch_size=4, world_size=1, lr=0.05, weight_decay=0.01, warmup_steps=3,
                               total_steps=10, grad_clip=1.0, precision="float32", use_gpu=False)
    use_this_interpreters_build_tools()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    return engine


def weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
        return [p.detach().clone() for p in params]


def backward(engine, x: torch.Tensor, inf: bool) -> None:
    loss = engine(x).pow(2).mean()
    assert torch.isfinite(loss)
    handle = None
    if inf:
        def put_inf(grad):
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        handle = next(iter(engine.module.parameters())).register_hook(put_inf)
    engine.backward(loss)
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3"])
def test_inf_gradient_is_caught_and_the_step_leaves_no_trace(process_group, zero):
    torch.manual_seed(1)
    bad, good = torch.randn(4, 6), [torch.randn(4, 6) for _ in range(3)]

    skipped = make_engine(zero)
    start, lr = weights(skipped), skipped.get_lr()
    backward(skipped, bad, inf=True)
    assert not local_grads_finite(skipped) and not grads_finite(skipped, torch.device("cpu"))
    discard_step(skipped)
    assert all(torch.equal(a, b) for a, b in zip(weights(skipped), start)), "a discarded step changed the weights"
    assert skipped.get_lr() == lr
    clean = make_engine(zero)  # the same run without the bad batch
    # Three good steps: the LR warms up from 0 over them, so a schedule advanced by the
    # discarded step would show in the weights.
    for x in good:
        for engine in (skipped, clean):
            backward(engine, x, inf=False)
            assert grads_finite(engine, torch.device("cpu"))
            engine.step()
    after, want = weights(skipped), weights(clean)
    assert not all(torch.equal(a, b) for a, b in zip(after, start)), "the good steps were not applied"
    assert all(torch.equal(a, b) for a, b in zip(after, want)), "the discarded step left gradients or state behind"
    assert all(torch.isfinite(w).all() for w in after)
    assert skipped.get_lr() == clean.get_lr()
