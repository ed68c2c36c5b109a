"""Inference export: contents, atomic write, round trip in a fresh load, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.checkpoint import (
    SPECIAL_IDS_KEY,
    SPECIAL_ROWS_KEY,
    WEIGHTS_FILE,
    load_export,
    save_export,
    trainable_state_dict,
)
from core.config import RunConfig
from core.model.builders import build_model
from core.prompts import IMG_EMB_TOKEN, tokenize_notes
from tests.conftest import tiny_model_dict

NOTES = [
    {"title": "Red bike", "topics": ["cycling"], "content": "A short ride."},
    {"title": "Lemon cake", "topics": [], "content": "Mix butter and sugar."},
]


def run_cfg(**model_over) -> RunConfig:
    return RunConfig.from_dict({"model": tiny_model_dict(**model_over), "train": {"seed": 5}})


def trained_model(cfg: RunConfig, seed: int = 5):
    """A built model whose trainable weights (and special rows) moved away from their init."""
    model, tok = build_model(cfg.model, cfg.loss, seed=seed)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # e.g. LoRA B starts at zero: make the adapters matter
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.log_scale.fill_(2.5)
        emb = tok.convert_tokens_to_ids(IMG_EMB_TOKEN)
        model.llm.get_input_embeddings().weight[emb] += 0.5
    return model.eval(), tok


def embed(model, tok, cfg):
    enc = tokenize_notes(tok, NOTES, cfg.model)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (len(NOTES), 3, cfg.model.image_size, cfg.model.image_size), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        return model(torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]), pixels)


@pytest.mark.parametrize(
    "over", [dict(), dict(lora=False, prompt_mode="basic", connector="mlp", output_dim=None)], ids=["lora-micl", "full-basic"]
)
def test_round_trip_gives_identical_embeddings(tmp_path, over):
    cfg = run_cfg(**over)
    model, tok = trained_model(cfg)
    before = embed(model, tok, cfg)
    out = save_export(model, tok, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) >= ["config.yaml", WEIGHTS_FILE]
    loaded, tok2, cfg2 = load_export(out)
    assert cfg2 == cfg
    assert tok2("Note: <IMG_EMB>")["input_ids"] == tok("Note: <IMG_EMB>")["input_ids"]
    after = embed(loaded, tok2, cfg2)
    # Same weights, same ops, same device: equal up to float32 round-off (tolerance 1e-6).
    torch.testing.assert_close(after.multimodal, before.multimodal, rtol=0, atol=1e-6)
    if before.visual is not None:
        torch.testing.assert_close(after.visual, before.visual, rtol=0, atol=1e-6)
    assert loaded.log_scale.item() == 2.5
    # and the export really carried the training: a fresh build embeds differently
    fresh, _ = build_model(cfg.model, cfg.loss, seed=5)
    assert (embed(fresh.eval(), tok, cfg).multimodal - before.multimodal).abs().max() > 1e-3


def test_export_holds_only_what_training_changed(tmp_path):
    from safetensors.torch import load_file

    cfg = run_cfg()
    model, tok = trained_model(cfg)
    save_export(model, tok, cfg, tmp_path / "export")
    keys = set(load_file(str(tmp_path / "export" / WEIGHTS_FILE)))
    assert not any(k.startswith("vision.") for k in keys)
    assert not any(k.startswith("llm.") and "lora_" not in k for k in keys)  # frozen base LLM left out
    assert any("lora_A" in k for k in keys) and any(k.startswith("connector.") for k in keys)
    assert {"log_scale", "fusion.gate.weight", "head.weight", SPECIAL_IDS_KEY, SPECIAL_ROWS_KEY} <= keys
    assert set(trainable_state_dict(model)) == keys - {SPECIAL_IDS_KEY, SPECIAL_ROWS_KEY}


def test_failed_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    cfg = run_cfg()
    model, tok = trained_model(cfg)
    out = save_export(model, tok, cfg, tmp_path / "export")
    before = (out / WEIGHTS_FILE).read_bytes()
    with torch.no_grad():
        model.log_scale.fill_(1.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_export(model, tok, cfg, out)
    assert (out / WEIGHTS_FILE).read_bytes() == before  # old export untouched
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind
    monkeypatch.undo()
    save_export(model, tok, cfg, out)  # a successful overwrite replaces it
    assert (out / WEIGHTS_FILE).read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_missing_key_or_file_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = run_cfg()
    model, tok = trained_model(cfg)
    out = save_export(model, tok, cfg, tmp_path / "export")
    state = load_file(str(out / WEIGHTS_FILE))
    del state["head.weight"]
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "build_seed": "5"})
    with pytest.raises(KeyError, match=r"model\.safetensors.*head\.weight"):
        load_export(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_export(out)
    with pytest.raises(FileNotFoundError):
        load_export(Path(tmp_path) / "nowhere")


def test_export_for_another_config_is_rejected(tmp_path):
    import yaml

    cfg = run_cfg()
    model, tok = trained_model(cfg)
    out = save_export(model, tok, cfg, tmp_path / "export")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["model"]["lora"] = False  # now the export lacks the full LLM weights
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(KeyError, match="missing"):
        load_export(out)
