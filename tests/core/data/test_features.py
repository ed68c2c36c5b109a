"""The frozen-feature cache: cached features give the live encoder's losses, gradients and
embeddings; a changed key recomputes; a corrupt cache is rebuilt with a message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import ConfigError, RunConfig, load_run_config
from core.data import features as F
from core.data.pipeline import iter_pair_batches_local
from core.evaluation import validation_recall
from core.metrics import flatten_recall
from core.model.builders import build_model
from core.step import forward_pair_batch
from tests.conftest import tiny_model_dict

IMAGELESS = (0, 1, 2, 3, 4, 5)
SMOKE = Path(__file__).resolve().parents[3] / "rayjobs" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """60 synthetic notes, six of them without an image (the blank-image path)."""
    from core.data.prepare import prepare

    out = tmp_path_factory.mktemp("features") / "synthetic"
    prepare("synthetic", out, num_notes=60, seed=0, top_t=4)
    notes = pq.read_table(out / "notes.parquet")
    images = [None if i in IMAGELESS else img for i, img in zip(notes["note_id"].to_pylist(), notes["image"].to_pylist())]
    notes = notes.set_column(notes.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(notes, out / "notes.parquet")
    return out


def run_cfg(data_dir, **model) -> RunConfig:
    return RunConfig.from_dict({"model": tiny_model_dict(**model), "data": {"path": str(data_dir)},
                                "eval": {"ks": [1, 5, 10], "batch_size": 16}})


def without_pixels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if "pixel_values" not in k and "has_image" not in k}


def step_grads(model, batch, cfg, features=None):
    model.zero_grad(set_to_none=True)
    loss, _ = forward_pair_batch(model, batch, cfg.loss, "cpu", features)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_step_and_validation_equal_the_live_encoder(prepared):
    """fp32, tiny model: loss and every gradient of a step agree to ~1e-6 with cached features,
    over batches that include image-less notes; validation metrics (and those of the text
    ablation with its blank image) are identical."""
    cfg = run_cfg(prepared)
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    model.train()
    cache = F.ensure_feature_cache(model.vision, str(prepared))
    live_batches = list(iter_pair_batches_local(prepared, "train", cfg, batch_size=8, seed=0))[:2]
    cached_batches = list(iter_pair_batches_local(prepared, "train", cfg, batch_size=8, seed=0, decode_images=False))[:2]
    assert not any("pixel_values" in k for k in cached_batches[0])
    imageless_seen = 0
    for live, cached in zip(live_batches, cached_batches):
        imageless_seen += int((~live["q_has_image"]).sum() + (~live["t_has_image"]).sum())
        loss_live, grads_live = step_grads(model, live, cfg)
        loss_cached, grads_cached = step_grads(model, cached, cfg, cache)
        torch.testing.assert_close(loss_cached, loss_live, rtol=1e-6, atol=1e-6)
        assert grads_live.keys() == grads_cached.keys() and len(grads_live) > 10
        for name in grads_live:
            torch.testing.assert_close(grads_cached[name], grads_live[name], rtol=1e-5, atol=1e-6, msg=name)
    assert imageless_seen > 0  # the blank-image features were exercised

    model.eval()
    for kw in ({}, {"modality": "text"}):  # the image-features baseline: tests/rayjobs/test_evaluate.py
        live = flatten_recall(validation_recall(model, str(prepared), cfg, "cpu", features=None, **kw))
        cached = flatten_recall(validation_recall(model, str(prepared), cfg, "cpu", **kw))  # auto: the cache above
        assert len(live) >= 9 and cached == pytest.approx(live, abs=1e-9), kw


def test_changed_image_size_or_weights_recomputes_and_same_key_reuses(prepared, capsys):
    cfg = run_cfg(prepared)
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    first = F.ensure_feature_cache(model.vision, str(prepared))
    capsys.readouterr()
    again = F.ensure_feature_cache(model.vision, str(prepared))
    assert again.directory == first.directory and capsys.readouterr().out == ""  # verified, not recomputed

    bigger = run_cfg(prepared, image_size=48)
    model48, _ = build_model(bigger.model, bigger.loss, seed=0)
    cache48 = F.ensure_feature_cache(model48.vision, str(prepared))
    out = capsys.readouterr().out
    assert cache48.directory != first.directory and "computing" in out and "image_size 32 -> 48" in out, out
    assert cache48.patches.shape[1] == model48.vision.num_patches == 36

    reseeded, _ = build_model(cfg.model, cfg.loss, seed=1)  # other random encoder weights
    cache_w = F.ensure_feature_cache(reseeded.vision, str(prepared))
    out = capsys.readouterr().out
    assert cache_w.directory not in (first.directory, cache48.directory) and "encoder" in out, out
    assert not np.allclose(cache_w.cls, first.cls)


def _rewrite(path, mutate) -> None:
    """Replace a cache file by a mutated copy (a new file, as a partial copy or a rewrite leaves it)."""
    data = bytearray(path.read_bytes())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(mutate(data)))
    os.replace(tmp, path)


def _flip_last_byte(data: bytearray) -> bytearray:
    data[-1] ^= 0xFF
    return data


@pytest.mark.parametrize("damage, message", [
    (lambda d: _rewrite(d / "patches.npy", _flip_last_byte), "patches.npy does not match its checksum"),
    (lambda d: _rewrite(d / "cls.npy", lambda b: b[: len(b) // 2]), "cls.npy has"),
    (lambda d: (d / F.MANIFEST).unlink(), "no manifest.json"),
    (lambda d: (d / F.MANIFEST).write_text("{not json"), "manifest.json unreadable"),
])
def test_corrupt_cache_is_rebuilt_with_a_message(prepared, capsys, damage, message):
    cfg = run_cfg(prepared)
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    good = F.ensure_feature_cache(model.vision, str(prepared))
    expected = np.array(good.patches)
    damage(good.directory)
    assert F.cache_problem(good.directory, good.manifest["key"], model.vision.num_patches,
                           model.vision.feature_dim) is not None
    capsys.readouterr()
    rebuilt = F.ensure_feature_cache(model.vision, str(prepared))
    out = capsys.readouterr().out
    assert "unusable" in out and message in out and "rebuilding" in out, out
    np.testing.assert_array_equal(np.array(rebuilt.patches), expected)
    assert F.cache_problem(rebuilt.directory, rebuilt.manifest["key"], model.vision.num_patches,
                           model.vision.feature_dim) is None


def test_in_place_corruption_is_caught_by_the_checksum(prepared):
    """A byte flipped inside a file, size unchanged: the digest check a new process runs finds it."""
    cfg = run_cfg(prepared)
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    good = F.ensure_feature_cache(model.vision, str(prepared))
    path = good.directory / "cls.npy"
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    problem = F.cache_problem(good.directory, good.manifest["key"], model.vision.num_patches, model.vision.feature_dim)
    assert problem == "cls.npy does not match its checksum (corrupt)"


def test_cache_off_reasons(prepared):
    assert F.feature_cache_off_reason(run_cfg(prepared)) is None
    off = RunConfig.from_dict({"model": tiny_model_dict(), "data": {"path": str(prepared), "feature_cache": "off"}})
    assert F.feature_cache_off_reason(off) == "data.feature_cache=off"
    text = run_cfg(prepared, prompt_mode="text", late_fusion=False)
    assert F.feature_cache_off_reason(text) == "the model reads no images"
    assert "remote" in F.feature_cache_off_reason(run_cfg("s3://bucket/data"))
    with pytest.raises(ConfigError, match=r"data.feature_cache='on' is invalid: allowed one of auto, off"):
        RunConfig.from_dict({"data": {"feature_cache": "on"}})
    assert load_run_config(SMOKE, ["data.feature_cache=off"]).data.feature_cache == "off"  # YAML's `off` is false


@pytest.mark.slow
def test_training_run_with_the_cache_matches_one_without(ray_local, tmp_path, prepared, capfd):
    """The real `run_training` (Ray Data pipeline without pixels, the worker reading the cache)
    gives the per-step losses and validation recall of a run that encodes images every step.
    Without the cache attached, the pixel-less batches would train as image-less notes and the
    losses would differ."""
    from rayjobs.train import run_training

    finals = {}
    for mode in ("off", "auto"):
        cfg = load_run_config(SMOKE, [f"data.path={prepared}", f"train.storage_path={tmp_path / 'runs'}",
                                      f"train.name=cache-{mode}", f"data.feature_cache={mode}", "train.num_workers=0",
                                      "train.deepspeed=zero0", "train.max_steps=3", "train.checkpoint_every=0"])
        finals[mode] = run_training(cfg)
    out = capfd.readouterr().out
    assert "frozen-feature cache off: data.feature_cache=off" in out
    losses = {m: [h["loss"] for h in json.loads((Path(f["checkpoint"]) / "state.json").read_text())["history"]]
              for m, f in finals.items()}
    assert len(losses["auto"]) == 3 and losses["auto"] == pytest.approx(losses["off"], rel=1e-5)
    recall = {m: {k: v for k, v in f.items() if k.startswith("R@")} for m, f in finals.items()}
    assert recall["auto"] and recall["auto"] == pytest.approx(recall["off"], abs=1e-6)
