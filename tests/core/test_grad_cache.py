"""GradCache (core.grad_cache via core.step.start_pair_step) against the plain step on a tiny
random-init model: same loss and same gradients of every trainable parameter, with duplicate
masking, mICL's two losses and Matryoshka prefixes; dropout replayed between the two passes."""

from __future__ import annotations

import pytest
import torch

from core.config import LossConfig, ModelConfig, RunConfig
from core.model.builders import build_model
from core.step import compute_loss, model_inputs, pair_batch_to_notes, pair_chunks, start_pair_step
from tests.conftest import tiny_model_dict
from tests.gloo import run_on_gloo_ranks


@pytest.fixture(scope="module")
def pair_batch(tmp_path_factory):
    """5 real pairs (an odd count: the last chunk is short); pair 1's target is pair 0's query,
    so duplicate masking has something to mask."""
    from core.data.pipeline import iter_pair_batches_local
    from core.data.prepare import prepare

    data = tmp_path_factory.mktemp("gc") / "synthetic"
    prepare("synthetic", str(data), num_notes=40, seed=0)
    batch = next(iter(iter_pair_batches_local(str(data), "train", RunConfig(model=ModelConfig(**tiny_model_dict())), 5)))
    for key in [k for k in batch if k.startswith("t_")]:
        batch[key][1] = batch["q_" + key[2:]][0]
    assert batch["t_note_id"][1] == batch["q_note_id"][0]
    return batch


def step_grads(batch, loss_cfg, seed=0, **model_over):
    """(loss, {name: grad}) of one step from a freshly built model (train mode)."""
    model, _ = build_model(ModelConfig(**tiny_model_dict(**model_over)), loss_cfg, seed=seed)
    model.train()
    torch.manual_seed(seed)
    loss, metrics, backward = start_pair_step(model, batch, loss_cfg, "cpu")
    backward()
    return loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        # fp32 tolerance: chunked forwards round differently (~1e-7 relative per embedding); tau's
        # gradient is a small difference of O(e^tau) terms, so it carries ~1e-6 absolute error
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pair_chunks_cover_the_layout_once():
    chunks = pair_chunks(5, 2)
    assert [c.tolist() for c in chunks] == [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9]]


@pytest.mark.parametrize("model_over,loss_over", [
    ({}, {}),                                                     # mICL: L_v and L_m
    ({}, {"matryoshka_dims": [4, 8, 16], "matryoshka_weights": [1.0, 0.5, 2.0]}),
    ({"prompt_mode": "basic"}, {"mask_duplicates": False, "learnable_temperature": False}),
])
def test_chunked_step_equals_unchunked(pair_batch, model_over, loss_over):
    loss0, m0, g0 = step_grads(pair_batch, LossConfig(**loss_over), **model_over)
    loss1, m1, g1 = step_grads(pair_batch, LossConfig(grad_cache_chunk_size=2, **loss_over), **model_over)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert m1.keys() == m0.keys() and float(m1["loss_m"]) == pytest.approx(float(m0["loss_m"]), rel=1e-6)
    assert_same_grads(g0, g1)
    if loss_over.get("learnable_temperature", True):
        assert "log_scale" in g0  # tau's gradient is part of the comparison


def test_dropout_masks_replay_between_the_passes(pair_batch):
    """With LoRA dropout on, the chunked step's gradient is that of the loss on the chunk
    embeddings drawn in pass 1: the replay must restore each chunk's RNG state."""
    over = {"lora_dropout": 0.5}
    loss_cfg = LossConfig(grad_cache_chunk_size=3)
    model, _ = build_model(ModelConfig(**tiny_model_dict(**over)), loss_cfg, seed=0)
    model.train()
    notes = pair_batch_to_notes(pair_batch)
    inputs = model_inputs(notes, "cpu")
    torch.manual_seed(0)
    chunks = pair_chunks(notes["input_ids"].shape[0] // 2, 3)
    outs = [model(**{k: v[rows] for k, v in inputs.items()}) for rows in chunks]  # same RNG order as pass 1
    order = torch.cat(chunks).argsort()
    mm = torch.cat([o.multimodal for o in outs])[order]
    vis = torch.cat([o.visual for o in outs])[order]

    class Out:
        multimodal, visual = mm, vis

    ref_loss, _ = compute_loss(Out, outs[0].log_scale, notes["note_id"], loss_cfg)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    after_ref = torch.get_rng_state()

    loss, _, grads = step_grads(pair_batch, loss_cfg, **over)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    assert_same_grads(ref, grads)
    assert torch.equal(torch.get_rng_state(), after_ref)  # the stream continues as after pass 1
    # and dropout really is on (LoRA B starts at zero, so it shows in the gradients, not the loss)
    no_dropout = step_grads(pair_batch, loss_cfg)[2]
    assert any(not torch.allclose(no_dropout[n], grads[n], rtol=1e-3, atol=1e-5) for n in grads)


# ---------------------------------------------------------------------------------------------
# Under DeepSpeed ZeRO 0-3 over 2 gloo processes: one engine.backward per chunk, one reduction
# ---------------------------------------------------------------------------------------------

STAGES = (("zero0", "no_grad"), ("zero1", "no_grad"), ("zero2", "with_grad"), ("zero3", "no_grad"))


def _deepspeed_worker(rank: int, world: int, data_dir: str, out_dir: str) -> None:
    """Each rank trains 2 steps on its own batches, plain and chunked, under every ZeRO stage."""
    import deepspeed

    from core.data.pipeline import iter_pair_batches_local
    from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools

    use_this_interpreters_build_tools()
    mcfg = ModelConfig(**tiny_model_dict())
    batches = list(iter_pair_batches_local(data_dir, "train", RunConfig(model=mcfg), 5, seed=0))[rank: 4: 2]
    results = {}
    for stage, gather in STAGES:
        for chunk in (0, 2):
            loss_cfg = LossConfig(gather=gather, grad_cache_chunk_size=chunk, matryoshka_dims=[8, 16])
            torch.manual_seed(0)
            model, _ = build_model(mcfg, loss_cfg, seed=0)
            ds = load_deepspeed_config(stage, micro_batch_size=5, world_size=2, lr=2e-3, weight_decay=0.001,
                                       warmup_steps=0, total_steps=2, grad_clip=1.0, precision="float32",
                                       use_gpu=False)
            engine, *_ = deepspeed.initialize(model=model, config=ds,
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            losses = []
            for batch in batches:
                loss, _, backward = start_pair_step(engine, batch, loss_cfg, "cpu")
                backward(engine.backward, engine.set_gradient_accumulation_boundary)
                engine.step()
                losses.append(float(loss))
            results[(stage, chunk)] = losses
            engine.destroy()
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_chunked_steps_equal_plain_steps_under_every_zero_stage_on_two_workers(tmp_path):
    """Cross-worker gather (no_grad and with_grad), duplicate masking, mICL and Matryoshka: the
    second step's loss shows the first step's update was the same."""
    from core.data.prepare import prepare

    prepare("synthetic", str(tmp_path / "data"), num_notes=60, seed=0)
    run_on_gloo_ranks(_deepspeed_worker, 2, str(tmp_path / "data"), str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for stage, _ in STAGES:
            plain, chunked = results[(stage, 0)], results[(stage, 2)]
            assert len(plain) == 2 and plain[0] != plain[1]
            assert chunked == pytest.approx(plain, abs=1e-5, rel=0), stage
