"""LLM training mode: LoRA adapters through peft, or a full fine-tune (REFERENCE §3, "ours").

    llm = apply_lora(llm, model_cfg)   # peft-wrapped when model_cfg.lora, else llm itself

Targets are module-name suffixes (`q_proj` matches `model.layers.3.self_attn.q_proj`), checked
here first so a typo fails with the field name and the names that would have worked, instead of
peft's generic error or, worse, a silently adapter-less target.
"""

from __future__ import annotations

import warnings

from torch import nn

from core.config import ConfigError


def linear_suffixes(model: nn.Module) -> list[str]:
    """Sorted last name components of every nn.Linear in `model` (what LoRA targets can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear) and name})


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full module name, or a dot-separated suffix of it.
    return name == target or name.endswith("." + target)


def check_lora_targets(llm: nn.Module, targets: list[str]) -> None:
    """Raise ConfigError when a target names no nn.Linear of `llm`."""
    linear_names = [name for name, module in llm.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(_matches(name, t) for name in linear_names)]
    if missing:
        raise ConfigError(
            f"model.lora_targets={list(targets)!r} is invalid: {missing!r} match no Linear module of the LLM; "
            f"available Linear name suffixes: {', '.join(linear_suffixes(llm))}"
        )


def apply_lora(llm: nn.Module, model_cfg) -> nn.Module:
    """Make the LLM trainable per `model_cfg`.

    Args:
        llm: HF causal LM.
        model_cfg: ModelConfig (`lora`, `lora_rank`, `lora_alpha`, `lora_dropout`, `lora_targets`).

    Returns:
        A peft model whose only trainable LLM parameters are the adapters (lora=True), or `llm`
        with every parameter trainable except an untied LM head, which NoteLLM2 never runs
        (a trainable parameter that never gets a gradient upsets DDP and wastes optimizer state).
    """
    if not model_cfg.lora:
        for p in llm.parameters():
            p.requires_grad_(True)
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not llm.get_input_embeddings().weight:
            out.weight.requires_grad_(False)
        return llm

    from peft import LoraConfig, get_peft_model

    check_lora_targets(llm, model_cfg.lora_targets)
    config = LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=list(model_cfg.lora_targets),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 still calls transformers' deprecated `is_gradient_checkpointing` alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llm, config)
