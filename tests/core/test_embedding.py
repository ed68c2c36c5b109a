"""core.embedding: the modality ablation's view of a batch and the in-process embedding loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.embedding import apply_modality, embed_notes_local, prefix_embeddings


def test_apply_modality():
    batch = {
        "note_id": np.array([5, 6]),
        "input_ids": np.array([[7, 8, 9, 0], [7, 9, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "pixel_values": np.full((2, 3, 4, 4), 200, dtype=np.uint8),
        "has_image": np.array([True, True]),
        "text_chars": np.array([30, 2]),
    }
    assert apply_modality(batch, "both")["input_ids"] is batch["input_ids"]
    text = apply_modality(batch, "text")
    # official text ablation: a blank image, still flagged as an image so it passes encoder and gate
    assert text["has_image"].all() and not text["pixel_values"].any()
    no_pixels = apply_modality({k: v for k, v in batch.items() if k != "pixel_values"}, "text")
    assert not no_pixels["has_image"].any()  # a model that reads no image: nothing to blank
    assert batch["pixel_values"].all()  # input untouched
    image = apply_modality(batch, "image", blank_ids=np.array([3, 4, 5, 6, 2]), pad_id=0)
    assert image["input_ids"].tolist() == [[3, 4, 5, 6, 2]] * 2
    assert image["attention_mask"].tolist() == [[1] * 5] * 2
    assert image["text_chars"].tolist() == [0, 0]
    assert image["pixel_values"] is batch["pixel_values"]
    with pytest.raises(ValueError, match="blank_ids"):
        apply_modality(batch, "image")
    with pytest.raises(ValueError, match="modality"):
        apply_modality(batch, "audio")


class _DotModel(torch.nn.Module):
    """Stand-in model: embedding = mean of the unmasked token ids, image flag, mode, mean pixel."""

    def forward(self, input_ids, attention_mask, pixel_values=None, has_image=None):
        from types import SimpleNamespace

        m = attention_mask.float()
        text = (input_ids.float() * m).sum(1) / m.sum(1)
        img = has_image.float() if has_image is not None else torch.zeros(len(input_ids))
        mode = torch.full_like(text, float(self.training))
        pix = pixel_values.float().flatten(1).mean(1) if pixel_values is not None else torch.zeros(len(input_ids))
        return SimpleNamespace(multimodal=torch.stack([text, img, mode, pix], dim=1), visual=None,
                               log_scale=torch.tensor(3.0))


def test_embed_notes_local_batches_and_restores_mode():
    n = 7
    notes = {
        "note_id": torch.arange(100, 100 + n),
        "input_ids": torch.arange(n * 3).view(n, 3),
        "attention_mask": torch.ones(n, 3, dtype=torch.long),
        "pixel_values": torch.full((n, 3, 4, 4), 7, dtype=torch.uint8),
        "has_image": torch.ones(n, dtype=torch.bool),
    }
    model = _DotModel().train()
    ids, emb = embed_notes_local(model, notes, "cpu", batch_size=3)
    assert model.training  # restored
    assert ids.tolist() == list(range(100, 100 + n))
    assert emb.shape == (n, 4) and (emb[:, 2] == 0).all()  # ran in eval mode
    ids2, emb2 = embed_notes_local(model, [{k: v[:4] for k, v in notes.items()}, {k: v[4:] for k, v in notes.items()}], "cpu", 2)
    assert torch.equal(ids, ids2) and torch.equal(emb, emb2)
    _, emb_text = embed_notes_local(model, notes, "cpu", 3, modality="text")
    # the text ablation blanks the pixels but keeps the image path (has_image) on
    assert (emb_text[:, 3] == 0).all() and (emb[:, 3] == 7).all()
    assert (emb_text[:, 1] == 1).all() and (emb[:, 1] == 1).all()


def test_prefix_embeddings_truncate_then_normalise():
    emb = torch.tensor([[3.0, 4.0, 12.0], [0.0, 2.0, 1.0]])
    assert torch.equal(prefix_embeddings(emb, None), emb)
    assert torch.allclose(prefix_embeddings(emb, 2), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="dim 4: allowed 1..3"):
        prefix_embeddings(emb, 4)
