"""DeepSpeed configs picked by name from cluster/deepspeed/<name>.json, with run values filled in.

The JSON files are the infrastructure (ZeRO stage, offload, buckets) and carry the official
recipe's values (REFERENCE §8) for the keys a run overrides. `load_deepspeed_config` replaces
exactly those keys from the run config, so one file serves a CPU smoke test and an 8-GPU run:

    ds = load_deepspeed_config("zero2", micro_batch_size=8, world_size=2, lr=1e-4, weight_decay=0.001,
                               warmup_steps=10, total_steps=100, grad_clip=1.0,
                               precision="float32", use_gpu=False)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds)

Keys filled from the run (everything else comes from the file unchanged):
    train_micro_batch_size_per_gpu, gradient_accumulation_steps (always 1), train_batch_size,
    optimizer.params (lr, weight_decay, torch_adam), scheduler.params (warmup_max_lr,
    warmup_num_steps, total_num_steps; warmup_min_lr only when warmup_steps is 0),
    gradient_clipping, bf16.enabled.

`torch_adam` picks torch.optim.AdamW instead of DeepSpeed's compiled optimizers: FusedAdam and
DeepSpeedCPUAdam are C++/CUDA ops built just-in-time, which CPU machines and pip-only CUDA
installs (no nvcc) cannot build. It is false only on GPU with the optimizer offloaded to CPU,
where DeepSpeedCPUAdam (a g++-built op) is several times faster than torch AdamW on CPU tensors.

Deliberately imports neither deepspeed nor ray: the trainer calls `deepspeed.initialize` itself.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from core.config import DTYPES, ConfigError

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "cluster" / "deepspeed"
"""Where the named ZeRO configs live (cluster/deepspeed/ at the repository root)."""


def available_deepspeed_configs() -> list[str]:
    """Names of the shipped configs (file stems under cluster/deepspeed/), sorted."""
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def offloads_optimizer(ds_config: dict) -> bool:
    """True when the config keeps optimizer states on the CPU (ZeRO-Offload / ZeRO-Infinity)."""
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def load_deepspeed_config(
    name: str,
    *,
    micro_batch_size: int,
    world_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    grad_clip: float,
    precision: str,
    use_gpu: bool,
) -> dict:
    """Read cluster/deepspeed/<name>.json and fill in the values that come from the run config.

    Args:
        name: config name, e.g. `zero2` or `zero3_offload` (see `available_deepspeed_configs`).
        micro_batch_size: samples per worker per step (the trainer's batch unit).
        world_size: number of training workers; train_batch_size = micro_batch_size * world_size.
        lr: peak learning rate reached at the end of warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps from the file's warmup_min_lr (0) to `lr`, then linear
            decay back to it by `total_steps` (DeepSpeed warms up over at least 2 steps, the
            first two at LR 0). 0 means a constant LR of `lr` from the first step.
        total_steps: optimizer steps of the whole run; the LR decays linearly to 0 by then.
        grad_clip: gradient-norm clip; 0 disables clipping.
        precision: `float32` or `bfloat16` (sets bf16.enabled).
        use_gpu: GPU workers; on CPU the optimizer is always torch AdamW (no op build).

    Returns:
        A plain dict ready for `deepspeed.initialize(config=...)`.

    Raises:
        ConfigError: unknown name, or a value DeepSpeed would reject later with a vaguer message.
    """
    path = DEEPSPEED_DIR / f"{name}.json"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ConfigError(
            f"train.deepspeed={name!r} is invalid: allowed one of {', '.join(available_deepspeed_configs())} "
            f"(files in {DEEPSPEED_DIR})"
        )
    for field, value, lo in (("micro_batch_size", micro_batch_size, 1), ("world_size", world_size, 1), ("total_steps", total_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"deepspeed {field}={value!r} is invalid: allowed an integer >= {lo}")
    if not lr > 0:
        raise ConfigError(f"deepspeed lr={lr!r} is invalid: allowed a number > 0")
    if precision not in DTYPES:
        raise ConfigError(f"deepspeed precision={precision!r} is invalid: allowed one of {', '.join(DTYPES)}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    cfg = copy.deepcopy(cfg)

    # Batch: DeepSpeed checks train_batch_size == micro * accumulation * world at initialize.
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = 1  # one contrastive batch per step: negatives are per step
    cfg["train_batch_size"] = micro_batch_size * world_size

    opt = cfg.setdefault("optimizer", {"type": "AdamW"})
    params = opt.setdefault("params", {})
    params["lr"] = float(lr)
    params["weight_decay"] = float(weight_decay)
    params["torch_adam"] = not (use_gpu and offloads_optimizer(cfg))

    sched = cfg.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {"warmup_type": "linear"}})
    sp = sched.setdefault("params", {})
    # DeepSpeed's WarmupDecayLR rejects 0 warm-up steps, warms up over at least 2 and lags one
    # step (step k runs at the LR computed after step k-1; step 0 at warmup_min_lr). A warm-up from
    # 0 therefore spends the first two steps at LR 0. warmup_steps=0 is expressed as warm-up from
    # lr to lr; since the decay ends at warmup_min_lr, that is a constant LR which trains from step 0.
    warm = max(1, min(int(warmup_steps), total_steps))
    if sched.get("type") == "WarmupCosineLR":  # ratios of the optimizer LR, not absolute LRs
        sp.update(total_num_steps=total_steps, warmup_num_steps=warm)
    else:
        sp.update(warmup_max_lr=float(lr), warmup_num_steps=warm, total_num_steps=total_steps)
        sp["warmup_min_lr"] = float(lr) if int(warmup_steps) <= 0 else float(sp.get("warmup_min_lr", 0.0))

    cfg["gradient_clipping"] = float(grad_clip)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bfloat16"}
    cfg.pop("fp16", None)  # one mixed-precision mode at a time; bf16 is the only one we support
    return cfg


def use_this_interpreters_build_tools() -> None:
    """Build DeepSpeed's JIT ops with this interpreter's tools, into this virtualenv's cache.

    DeepSpeed builds its C++ ops with the first `ninja` on PATH, and ninja rebuilds everything
    when another ninja version wrote the build log last (pip's 1.13 and Debian's 1.11 use
    different log formats): about a minute per switch on 2 cores. The virtualenv's bin directory
    holds pip's ninja; putting it first makes set-up, drivers and Ray workers agree however they
    were started (activated venv or not).

    The compile command names the virtualenv's torch include paths, so two checkouts sharing
    torch's default cache (~/.cache/torch_extensions) rebuild the op each time the other one used
    it. Inside a virtualenv, and unless TORCH_EXTENSIONS_DIR is already set, ops are cached in
    `<venv>/torch_extensions`: built once by set-up (`rayjobs.fetch_assets`), reused by every run.
    """
    import os
    import sys

    bin_dir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.exists(os.path.join(bin_dir, "ninja")) and parts[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[q for q in parts if q != bin_dir]])
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
