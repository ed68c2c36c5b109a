"""Suite `gpu_mfu`: model FLOPs utilisation of a bf16 ZeRO-2 step (the SmolLM2 default model and a
1B-class random Llama); skipped, with the reason recorded, when no CUDA GPU is visible."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import LossConfig, ModelConfig
from core.deepspeed_config import load_deepspeed_config, use_this_interpreters_build_tools
from core.model.builders import build_model, resolve_llm_path
from core.step import forward_pair_batch
from rayjobs.benchmark.harness import Context, figure, log, spread
from rayjobs.train_worker import _init_process_group_if_local

# Dense bf16 tensor-core peak (no sparsity) by device-name substring, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def _llama_1b_dir(root: Path, tokenizer_src: str) -> str:
    """A random-init 1.1B Llama (TinyLlama shape) saved as an HF directory, with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # heavy; only this GPU-only path needs it

    target = root / "llama-1b-random"
    if not (target / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_src)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(target)
        tok.save_pretrained(target)
    return str(target)


def _synthetic_batch(mcfg: ModelConfig, batch_pairs: int) -> dict:
    """A pair batch (core.step layout) of random token ids and images, every note with an image."""
    g = torch.Generator().manual_seed(0)
    T, S = mcfg.max_text_tokens, mcfg.image_size
    batch = {}
    for side, base in (("q_", 0), ("t_", batch_pairs)):
        batch[side + "input_ids"] = torch.randint(100, 1000, (batch_pairs, T), generator=g)
        batch[side + "attention_mask"] = torch.ones(batch_pairs, T, dtype=torch.long)
        batch[side + "pixel_values"] = torch.randint(0, 255, (batch_pairs, 3, S, S), generator=g, dtype=torch.uint8)
        batch[side + "has_image"] = torch.ones(batch_pairs, dtype=torch.bool)
        batch[side + "note_id"] = torch.arange(base, base + batch_pairs)
    return batch


def _mfu_one(model_over: dict, batch_pairs: int, steps: int, warmup: int) -> dict:
    """bf16 ZeRO-2 steps of one model on one GPU with a synthetic batch; FLOPs by torch's counter."""
    import deepspeed  # heavy; only this GPU-only path needs it

    _init_process_group_if_local(True)
    mcfg, lcfg = ModelConfig(**{**model_over, "dtype": "bfloat16"}), LossConfig()
    model, tok = build_model(mcfg, lcfg)
    model.to("cuda")
    batch = _synthetic_batch(mcfg, batch_pairs)
    with FlopCounterMode(display=False) as counter:
        loss, _ = forward_pair_batch(model, batch, lcfg, "cuda")
        loss.backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    ds = load_deepspeed_config("zero2", micro_batch_size=batch_pairs, world_size=1, lr=1e-4, weight_decay=0.0, warmup_steps=0,
                               total_steps=steps + warmup, grad_clip=1.0, precision="bfloat16", use_gpu=True)
    use_this_interpreters_build_tools()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = forward_pair_batch(engine, batch, lcfg, "cuda")
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    tflops = [flops / t / 1e12 for t in times]
    del engine, model
    torch.cuda.empty_cache()
    return {"flops_per_step": flops, "step_s": times, "tflops": tflops, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": [f / (peak / 1e12) for f in tflops] if peak else None}


def run(ctx: Context) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": f"no CUDA GPU visible (torch {torch.__version__}, "
                                               f"torch.cuda.is_available() is False); MFU needs a GPU"}
    models = {"smollm2_default": {},  # the paper-style default ModelConfig: full SmolLM2-135M, MobileNetV2 224 px
              "llama_1b_random": {"llm": _llama_1b_dir(ctx.out / "models", resolve_llm_path("smollm2-135m"))}}
    figures, absolute = {}, {}
    for name, over in models.items():
        log(f"gpu_mfu: {name}")
        r = _mfu_one(over, batch_pairs=16 if ctx.size == "full" else 4, steps=10 if ctx.size == "full" else 3, warmup=3 if ctx.size == "full" else 1)
        absolute[f"{name}_step_s"] = spread(r["step_s"], "s")
        absolute[f"{name}_tflops"] = spread(r["tflops"], "TFLOP/s")
        if r["mfu"]:
            figures[f"mfu_{name}"] = figure(float(np.median(r["mfu"])), None, True,
                                            f"counted model FLOPs/s / dense bf16 peak {r['peak_tflops']:.0f} TFLOP/s")
        else:
            figures[f"tflops_{name}"] = figure(float(np.median(r["tflops"])), None, True, "achieved TFLOP/s (peak unknown for this GPU)")
    return {"figures": figures, "absolute": absolute, "config": {"gpu": torch.cuda.get_device_name(0), "precision": "bf16", "deepspeed": "zero2"}}
