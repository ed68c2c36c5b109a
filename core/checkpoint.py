"""Inference export: what training changed, loadable without Ray or DeepSpeed.

    save_export(model, tokenizer, run_cfg, "runs/demo/export")
    model, tokenizer, run_cfg = load_export("runs/demo/export")

An export directory holds
- `model.safetensors`: the trainable parameters (LoRA adapters, or the whole LLM when
  model.lora is false; connector, gate, head), `log_scale`, and the input-embedding rows of the
  added special tokens (`special_tokens.ids`, `special_tokens.input_embeddings`);
- `config.yaml`: the RunConfig (`core.config.dump_run_config`);
- the tokenizer files.
Everything else (pretrained LLM and vision weights, random-init frozen weights of the tiny test
models, reproduced from the recorded build seed) is rebuilt by `build_model`.

The directory is written under a temporary name and renamed into place, so a half-written
export is never visible at `out_dir`. Local paths only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
SPECIAL_IDS_KEY = "special_tokens.ids"
SPECIAL_ROWS_KEY = "special_tokens.input_embeddings"
FORMAT = "notellm2-export-v1"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters that training changes: every requires_grad parameter, plus `log_scale`.

    Training checkpoints use it to leave the frozen weights out. Under ZeRO-3, call it inside
    `deepspeed.zero.GatheredParameters` (partitioned parameters are empty outside it).
    """
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if hasattr(model, "log_scale"):
        state["log_scale"] = model.log_scale.detach()  # kept even when tau is fixed: it documents the run
    return state


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load a `trainable_state_dict` into `model`: every model-trainable key must be there and
    every given key must be a parameter of the model with the same shape.

    Raises:
        KeyError: a key is missing or unknown, naming `source`.
        ValueError: a shape differs.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(set(trainable_state_dict(model)) - set(state))
    if unknown or missing:
        raise KeyError(
            f"{source} does not match this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
            "(was it written for a different model config?)")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if p.shape != value.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def _special_token_rows(model: nn.Module, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    from core.prompts import SPECIAL_TOKENS

    ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), dtype=torch.int64)
    weight = model.llm.get_input_embeddings().weight
    return ids, weight.detach()[ids.to(weight.device)]  # [k], [k, h_t]


def save_export(model: nn.Module, tokenizer, run_cfg, out_dir: str | os.PathLike) -> Path:
    """Write an inference export of `model` to `out_dir` (atomically replaced if it exists).

    Args:
        model: the NoteLLM2 (unwrapped: DeepSpeed's `engine.module`; gathered under ZeRO-3).
        tokenizer: its tokenizer (holding `<IMG>`/`<IMG_EMB>`).
        run_cfg: RunConfig the model was built from.
        out_dir: export directory.

    Returns:
        The export directory.
    """
    from safetensors.torch import save_file

    from core.config import dump_run_config

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    try:
        tensors = dict(trainable_state_dict(model))
        tensors[SPECIAL_IDS_KEY], tensors[SPECIAL_ROWS_KEY] = _special_token_rows(model, tokenizer)
        # safetensors wants contiguous CPU tensors with unshared storage
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        metadata = {"format": "pt", "notellm2": FORMAT, "build_seed": str(getattr(model, "build_seed", run_cfg.train.seed))}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        dump_run_config(run_cfg, tmp / CONFIG_FILE)
        tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a model from an export directory.

    Args:
        path: directory written by `save_export`.
        device: where the model goes.

    Returns:
        (NoteLLM2 in eval mode, tokenizer, RunConfig).

    Raises:
        FileNotFoundError: the directory lacks model.safetensors or config.yaml.
        KeyError / ValueError: the weights do not match the configured model (names the file).
    """
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from core.config import RunConfig
    from core.model.builders import build_model

    root = Path(path)
    weights, config = root / WEIGHTS_FILE, root / CONFIG_FILE
    for f in (weights, config):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: {root} is not a complete NoteLLM-2 export")
    run_cfg = RunConfig.from_dict(yaml.safe_load(config.read_text()), str(config))
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    seed = int(metadata.get("build_seed", run_cfg.train.seed))

    model, built_tokenizer = build_model(run_cfg.model, run_cfg.loss, seed=seed)
    state = load_file(str(weights))
    for key in (SPECIAL_IDS_KEY, SPECIAL_ROWS_KEY):
        if key not in state:
            raise KeyError(f"{weights}: missing {key}")
    ids, rows = state.pop(SPECIAL_IDS_KEY), state.pop(SPECIAL_ROWS_KEY)
    load_trainable_state_dict(model, state, source=str(weights))
    embedding = model.llm.get_input_embeddings().weight
    if ids.max() >= embedding.shape[0] or rows.shape[1] != embedding.shape[1]:
        raise ValueError(f"{weights}: special-token rows do not fit the LLM's embedding matrix {tuple(embedding.shape)}")
    with torch.no_grad():
        embedding[ids] = rows.to(embedding.dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(root))
    tokenizer.padding_side = "right"
    if len(tokenizer) != len(built_tokenizer):
        raise ValueError(f"{root}: saved tokenizer has {len(tokenizer)} tokens, the model's has {len(built_tokenizer)}")
    return model.to(device).eval(), tokenizer, run_cfg
