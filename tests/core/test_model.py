"""NoteLLM-2 model core: vision encoders, connectors, late fusion, splicing, pooling, trainability.

Tiny random-init models (tests/conftest.py: tiny-llama + tiny-cnn at 32 px), fixed seeds. The
pooling tests recompute every embedding with an independent per-note loop (no padding, no
vectorised gather) and compare.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError, LossConfig, ModelConfig
from core.model.builders import build_model, build_vision_encoder, count_parameters
from core.model.connector import MLPConnector, QFormerConnector
from core.model.fusion import LateFusionGate
from core.model.notellm2 import decoder_of, splice_visual_tokens
from core.model.vision import HFVisionEncoder, MobileNetV2Encoder, TinyCNNEncoder, TinyViTEncoder
from core.prompts import IMG_EMB_TOKEN, IMG_TOKEN, tokenize_notes
from tests.conftest import has_assets, tiny_model_dict

NOTES = [
    {"title": "Red bike", "topics": ["cycling"], "content": "A short ride."},
    {"title": "Lemon cake recipe", "topics": ["baking", "dessert"], "content": "Mix butter, sugar and zest; bake for forty minutes."},
    {"title": "", "topics": [], "content": "x"},
]


def tiny_cfg(**over) -> ModelConfig:
    return ModelConfig(**tiny_model_dict(**over))


def batch_for(tokenizer, cfg, notes=NOTES, seed=0):
    enc = tokenize_notes(tokenizer, notes, cfg)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (len(notes), 3, cfg.image_size, cfg.image_size), generator=gen, dtype=torch.uint8)
    return torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]), pixels


def capture_decoder_inputs(model):
    """Record the kwargs the LLM decoder body is called with."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = decoder_of(model.llm).register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


# ----------------------------------------------------------------------------------------------
# Splicing and pooling


def test_splice_matches_hand_built_rows():
    # 2 rows, T=5, L=3, h=1 so every embedding is its own label
    text = torch.tensor([[10.0, 11, 12, 13, 14], [20.0, 21, 22, 23, 24]]).unsqueeze(-1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    pos = torch.tensor([1, 0])
    visual = torch.tensor([[-1.0, -2, -3], [-4.0, -5, -6]]).unsqueeze(-1)
    embeds, new_mask = splice_visual_tokens(text, mask, pos, visual)
    assert embeds.squeeze(-1).tolist() == [[10, -1, -2, -3, 12, 13, 14], [-4, -5, -6, 21, 22, 23, 24]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("mode", ["basic", "micl"])
def test_sequence_grows_by_L_minus_1_with_right_padding(mode):
    cfg = tiny_cfg(prompt_mode=mode, num_visual_tokens=5)
    model, tok = build_model(cfg, seed=0)
    ids, mask, pixels = batch_for(tok, cfg)
    seen, handle = capture_decoder_inputs(model)
    with torch.no_grad():
        model(ids, mask, pixels)
    handle.remove()
    n, t = ids.shape
    assert seen["inputs_embeds"].shape[:2] == (n, t + 5 - 1)
    assert seen["attention_mask"].sum(dim=1).tolist() == (mask.sum(dim=1) + 4).tolist()
    # right padding: each row is ones then zeros
    m = seen["attention_mask"]
    assert torch.all(m[:, 1:] <= m[:, :-1])


def reference_embeddings(model, ids, mask, pixels, has_image):
    """Per-note loop: build the spliced sequence as a Python list, run it unpadded, pool by search."""
    body = decoder_of(model.llm)
    embed = model.llm.get_input_embeddings()
    L = model.num_visual_tokens
    out_m, out_v = [], []
    with torch.no_grad():
        patches, cls = model.vision(pixels) if model.vision is not None else (None, None)
        for i in range(ids.shape[0]):
            row = ids[i, : int(mask[i].sum())].tolist()
            vectors, labels = [], []
            for tok_id in row:
                if tok_id == model.img_token_id and model.connector is not None:
                    visual = model.connector(patches[i : i + 1])[0] if has_image[i] else torch.zeros(L, embed.embedding_dim)
                    vectors += list(visual)
                    labels += ["visual"] * L
                else:
                    vectors.append(embed(torch.tensor(tok_id)))
                    labels.append(tok_id)
            hidden = body(inputs_embeds=torch.stack(vectors)[None], use_cache=False).last_hidden_state[0]
            n_m = hidden[len(labels) - 1]
            n_v = hidden[labels.index(model.img_emb_token_id) - 1] if model.prompt_mode == "micl" else None
            if model.fusion is not None and has_image[i]:
                v = model.fusion.vision_proj(cls[i])
                n_m = model.fusion(n_m[None], v[None])[0]
                n_v = None if n_v is None else model.fusion(n_v[None], v[None])[0]
            if model.head is not None:
                n_m = model.head(n_m)
                n_v = None if n_v is None else model.head(n_v)
            out_m.append(n_m)
            out_v.append(n_v)
    return torch.stack(out_m), (torch.stack(out_v) if model.prompt_mode == "micl" else None)


@pytest.mark.parametrize(
    "over",
    [
        dict(prompt_mode="micl"),
        dict(prompt_mode="basic"),
        dict(prompt_mode="basic", connector="mlp", late_fusion=False, output_dim=None),
        dict(prompt_mode="text", late_fusion=True),
        dict(prompt_mode="text", late_fusion=False),
    ],
    ids=["micl", "basic", "basic-mlp-nofusion-nohead", "text-fusion", "text"],
)
def test_pooling_positions_match_per_note_reference(over):
    cfg = tiny_cfg(**over)
    model, tok = build_model(cfg, seed=1)
    model.eval()
    ids, mask, pixels = batch_for(tok, cfg)
    has_image = torch.tensor([True, True, False])
    with torch.no_grad():
        out = model(ids, mask, pixels, has_image)
    ref_m, ref_v = reference_embeddings(model, ids, mask, pixels, has_image)
    d = cfg.output_dim or model.llm.get_input_embeddings().embedding_dim
    assert out.multimodal.shape == (3, d) and out.multimodal.dtype == torch.float32
    torch.testing.assert_close(out.multimodal, ref_m, rtol=1e-4, atol=1e-5)
    if cfg.prompt_mode == "micl":
        assert out.visual.shape == (3, d)
        torch.testing.assert_close(out.visual, ref_v, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out.visual, out.multimodal)  # two different slots
    else:
        assert out.visual is None


def test_prompt_without_image_token_is_rejected(tiny_model_cfg):
    model, tok = build_model(tiny_model_cfg)
    text_cfg = tiny_cfg(prompt_mode="text")
    ids, mask, pixels = batch_for(tok, text_cfg)  # text prompts: no <IMG>
    with pytest.raises(ValueError, match="<IMG>"):
        model(ids, mask, pixels)


# ----------------------------------------------------------------------------------------------
# The image matters


@pytest.mark.parametrize(
    "over",
    [dict(prompt_mode="basic", late_fusion=False), dict(prompt_mode="micl", late_fusion=False),
     dict(prompt_mode="micl"), dict(prompt_mode="text", late_fusion=True)],
    ids=["basic", "micl", "micl-fusion", "text-late-fusion"],
)
def test_image_changes_embedding_and_missing_image_is_text_only(over):
    cfg = tiny_cfg(**over)
    model, tok = build_model(cfg, seed=2)
    model.eval()
    ids, mask, pix_a = batch_for(tok, cfg, seed=0)
    _, _, pix_b = batch_for(tok, cfg, seed=1)
    with torch.no_grad():
        a = model(ids, mask, pix_a)
        b = model(ids, mask, pix_b)
        none = model(ids, mask, None)
        off = torch.zeros(len(ids), dtype=torch.bool)
        a_off = model(ids, mask, pix_a, off)
        b_off = model(ids, mask, pix_b, off)
    assert (a.multimodal - b.multimodal).abs().max() > 1e-4
    if cfg.prompt_mode == "micl":
        assert (a.visual - b.visual).abs().max() > 1e-4
    # has_image False: the pixels are ignored, same as passing no image at all
    torch.testing.assert_close(a_off.multimodal, b_off.multimodal, rtol=0, atol=1e-6)
    torch.testing.assert_close(a_off.multimodal, none.multimodal, rtol=0, atol=1e-6)
    assert (a.multimodal - none.multimodal).abs().max() > 1e-4


def test_text_mode_without_fusion_ignores_pixels():
    cfg = tiny_cfg(prompt_mode="text", late_fusion=False)
    model, tok = build_model(cfg)
    assert model.vision is None and model.connector is None and model.fusion is None
    ids, mask, pixels = batch_for(tok, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pixels).multimodal, model(ids, mask).multimodal, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Trainability


def test_no_gradient_reaches_vision_and_vision_stays_eval(tiny_model_cfg):
    model, tok = build_model(tiny_model_cfg)
    model.train()
    assert not model.vision.training
    ids, mask, pixels = batch_for(tok, tiny_model_cfg)
    out = model(ids, mask, pixels)
    (out.multimodal.sum() + out.visual.sum() + out.log_scale).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    # the image path is live: the connector and the gate did get gradients
    assert model.connector.queries.grad is not None and model.connector.queries.grad.abs().sum() > 0
    assert model.fusion.vision_proj.weight.grad.abs().sum() > 0
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_lora_trains_only_adapters_connector_gate_head_and_tau(tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg)
    names = count_parameters(model)["trainable_names"]
    groups = {"lora": [n for n in names if "lora_" in n], "connector": [n for n in names if n.startswith("connector.")],
              "fusion": [n for n in names if n.startswith("fusion.")], "head": [n for n in names if n.startswith("head.")]}
    assert all(groups.values()), groups
    assert "log_scale" in names
    assert sorted(names) == sorted(sum(groups.values(), ["log_scale"]))
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts["total"]


def test_full_finetune_trains_the_whole_llm_but_not_vision():
    cfg = tiny_cfg(lora=False)
    model, _ = build_model(cfg)
    assert all(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_fixed_temperature(tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, LossConfig(temperature_init=2.0, learnable_temperature=False))
    assert model.log_scale.item() == 2.0 and not model.log_scale.requires_grad
    assert "log_scale" not in count_parameters(model)["trainable_names"]


def test_bad_lora_targets_name_the_field():
    with pytest.raises(ConfigError) as err:
        build_model(tiny_cfg(lora_targets=["q_proj", "qkv"]))
    msg = str(err.value)
    assert "model.lora_targets" in msg and "qkv" in msg and "v_proj" in msg and "gate_proj" in msg


def test_qformer_heads_must_divide_width():
    with pytest.raises(ConfigError, match="model.qformer_heads"):
        build_model(tiny_cfg(qformer_heads=5))


def test_build_is_seeded_and_leaves_global_rng_alone(tiny_model_cfg):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_model(tiny_model_cfg, seed=7)
    assert torch.rand(1).item() == expected.item()
    b, _ = build_model(tiny_model_cfg, seed=7)
    c, _ = build_model(tiny_model_cfg, seed=8)
    assert torch.equal(a.connector.queries, b.connector.queries)
    assert not torch.equal(a.connector.queries, c.connector.queries)


# ----------------------------------------------------------------------------------------------
# LLM builder


def test_special_token_rows_start_at_the_mean(tiny_model_cfg):
    model, tok = build_model(tiny_model_cfg)
    weight = model.llm.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    assert weight.shape[0] == len(tok)
    mean = weight[: min(ids)].mean(dim=0)  # byte tokenizer: the special tokens are the last rows
    for i in ids:
        torch.testing.assert_close(weight[i], mean)


def test_padded_vocabulary_rows_of_added_tokens_are_mean_initialised():
    # Qwen-style: the embedding matrix already has rows for the added ids, untrained ones
    from core.model.builders import build_llm

    cfg = tiny_cfg()
    torch.manual_seed(0)
    llm = build_llm(cfg, vocab_size=259, mean_init_ids=[257, 258])
    weight = llm.get_input_embeddings().weight
    assert weight.shape[0] == 259
    torch.testing.assert_close(weight[257], weight[:257].mean(dim=0))
    torch.testing.assert_close(weight[258], weight[:257].mean(dim=0))
    assert not torch.allclose(weight[256], weight[:257].mean(dim=0))


def test_llm_layer_truncation():
    model, tok = build_model(tiny_cfg(llm_num_layers=1))
    body = decoder_of(model.llm)
    assert len(body.layers) == 1 and model.llm.config.num_hidden_layers == 1
    ids, mask, pixels = batch_for(tok, tiny_cfg())
    assert torch.isfinite(model(ids, mask, pixels).multimodal).all()
    with pytest.raises(ConfigError, match="model.llm_num_layers"):
        build_model(tiny_cfg(llm_num_layers=3))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        cfg = tiny_cfg(gradient_checkpointing=ckpt)
        model, tok = build_model(cfg, seed=3)
        model.train()
        ids, mask, pixels = batch_for(tok, cfg)
        model(ids, mask, pixels).multimodal.square().sum().backward()
        grads.append(model.connector.queries.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bfloat16_computes_in_bf16_and_returns_float32():
    cfg = tiny_cfg(dtype="bfloat16")
    model, tok = build_model(cfg)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.connector.queries.dtype == torch.bfloat16
    ids, mask, pixels = batch_for(tok, cfg)
    out = model(ids, mask, pixels)
    assert out.multimodal.dtype == torch.float32 and torch.isfinite(out.multimodal).all()


# ----------------------------------------------------------------------------------------------
# Building blocks


def test_connectors_shapes():
    torch.manual_seed(0)
    patches = torch.randn(2, 49, 24)
    assert QFormerConnector(24, 40, num_tokens=6, num_layers=2, num_heads=4)(patches).shape == (2, 6, 40)
    assert QFormerConnector(24, 40, num_tokens=6, num_layers=1, num_heads=4, dim=16)(patches).shape == (2, 6, 40)
    mlp = MLPConnector(24, 40, num_tokens=7)
    # 49 patches pooled to 7 tokens: token k averages patches 7k..7k+6
    torch.testing.assert_close(mlp(patches), mlp.mlp(patches.view(2, 7, 7, 24).mean(dim=2)))


def test_late_fusion_gate_formula():
    gate = LateFusionGate(vision_dim=3, llm_dim=2, gate_bias=True)
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.copy_(torch.tensor([0.0, 100.0]))  # z = (0.5, ~1)
    note, v = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, -2.0]])
    torch.testing.assert_close(gate(note, v), torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(gate(note, v, torch.tensor([False])), note)
    assert LateFusionGate(3, 2, gate_bias=False).gate.bias is None
    assert gate.vision_proj.bias is None


@pytest.mark.parametrize("encoder", [TinyCNNEncoder(32), TinyViTEncoder(32)], ids=["tiny-cnn", "tiny-vit"])
def test_tiny_encoders(encoder):
    encoder.train()
    assert not encoder.training
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    patches, cls = encoder(pixels)
    assert patches.shape == (2, encoder.num_patches, encoder.feature_dim) and cls.shape == (2, encoder.feature_dim)
    assert not patches.requires_grad
    # uint8 0-255 and float 0-1 are the same image
    patches_f, _ = encoder(pixels.float() / 255)
    torch.testing.assert_close(patches, patches_f)


def test_mobilenet_v2_layout_and_shapes():
    torch.manual_seed(0)
    enc = MobileNetV2Encoder(224)
    keys = set(enc.state_dict())
    # torchvision's names: features.<block>.conv.<i>... and Conv2dNormActivation as Sequential
    for key in ("features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.2.conv.3.running_var", "features.18.0.weight"):
        assert key in keys
    assert len(keys) == 312  # torchvision mobilenet_v2 minus its 2 classifier tensors
    patches, cls = enc(torch.rand(1, 3, 224, 224))
    assert enc.num_patches == 49 and patches.shape == (1, 49, 1280)
    torch.testing.assert_close(cls, patches.mean(dim=1))


def test_mobilenet_v2_folded_batchnorm_matches_the_plain_modules_and_follows_new_weights():
    """The encoder runs a BN-folded channels-last copy of its layers; it must give the plain
    modules' features, keep the pretrained state-dict layout and refold after a weight load."""
    torch.manual_seed(0)
    enc = MobileNetV2Encoder(64)
    with torch.no_grad():  # non-trivial BN statistics, as pretrained weights have
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    pixels = enc.preprocess(torch.rand(3, 3, 64, 64))
    with torch.no_grad():
        plain = enc.features(pixels).flatten(2).transpose(1, 2)
        patches, _ = enc.encode(pixels)
    torch.testing.assert_close(patches, plain, rtol=1e-4, atol=1e-4)
    assert len(enc.state_dict()) == 312 and not any("_folded" in k for k in enc.state_dict())

    other = MobileNetV2Encoder(64)  # different random weights
    enc.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(pixels)[0], other.features(pixels).flatten(2).transpose(1, 2),
                                   rtol=1e-4, atol=1e-4)


def _tiny_hf_configs():
    from transformers import CLIPVisionConfig, SiglipVisionConfig, ViTConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    return {"clip": CLIPVisionConfig(**common), "vit": ViTConfig(**common), "siglip": SiglipVisionConfig(**common)}


@pytest.mark.parametrize("kind", ["clip", "vit", "siglip"])
def test_hf_vision_wrapper(kind):
    from transformers import AutoModel

    torch.manual_seed(0)
    hf = AutoModel.from_config(_tiny_hf_configs()[kind])
    enc = HFVisionEncoder(hf, image_size=32)
    assert enc.feature_dim == 32
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    patches, cls = enc(pixels)
    with torch.no_grad():
        hidden = enc.model(pixel_values=(pixels.float() / 255 - 0.5) / 0.5).last_hidden_state
    if kind == "siglip":  # no class token: all 16 tokens are patches, CLS is their mean
        assert not enc.has_cls_token and enc.num_patches == 16
        torch.testing.assert_close(patches, hidden)
        torch.testing.assert_close(cls, hidden.mean(dim=1))
    else:
        assert enc.has_cls_token and enc.num_patches == 16
        torch.testing.assert_close(patches, hidden[:, 1:])
        torch.testing.assert_close(cls, hidden[:, 0])
    assert all(not p.requires_grad for p in enc.parameters())


def test_hf_vision_encoder_from_directory_in_a_model(tmp_path):
    from transformers import AutoModel, CLIPImageProcessor

    torch.manual_seed(0)
    AutoModel.from_config(_tiny_hf_configs()["clip"]).save_pretrained(tmp_path)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]).save_pretrained(tmp_path)
    cfg = tiny_cfg(vision=str(tmp_path), qformer_heads=2)
    enc = build_vision_encoder(cfg)
    torch.testing.assert_close(enc.pixel_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    model, tok = build_model(cfg)
    ids, mask, pixels = batch_for(tok, cfg)
    out = model(ids, mask, pixels)
    assert out.multimodal.shape == (3, cfg.output_dim) and torch.isfinite(out.multimodal).all()


# ----------------------------------------------------------------------------------------------
# Real assets


def _pil_images(size: int) -> torch.Tensor:
    from PIL import Image, ImageDraw

    sun = Image.new("RGB", (size, size), "skyblue")
    ImageDraw.Draw(sun).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="yellow")
    stripes = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(stripes)
    for x in range(0, size, 16):
        draw.rectangle((x, 0, x + 7, size), fill="darkgreen")
    arrays = [np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) for im in (sun, stripes)]
    return torch.from_numpy(np.stack(arrays))  # [2, 3, S, S] uint8


@pytest.mark.assets
@pytest.mark.skipif(not has_assets(), reason="offline assets missing: python -m rayjobs.fetch_assets")
def test_real_smollm2_and_mobilenet_embed_two_notes():
    cfg = ModelConfig()  # defaults: SmolLM2-135M (all 30 layers), MobileNetV2, Q-Former, mICL, late fusion
    model, tok = build_model(cfg, seed=0)
    model.eval()
    assert model.vision.num_patches == 49
    ids, mask, _ = batch_for(tok, cfg, notes=NOTES[:2])
    with torch.no_grad():
        out = model(ids, mask, _pil_images(cfg.image_size))
    for emb in (out.multimodal, out.visual):
        assert emb.shape == (2, 64) and torch.isfinite(emb).all()
        assert (emb.norm(dim=1) > 1e-6).all()  # unit-normalisable
    normed = torch.nn.functional.normalize(out.multimodal, dim=1)
    assert (normed[0] - normed[1]).abs().max() > 1e-3
