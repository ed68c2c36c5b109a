"""The one place that knows the batch layout: pair batch -> model inputs -> loss -> metrics.

A training batch (from `core.data.pipeline`, via Ray Data `iter_torch_batches`) holds one row
per related pair, each side's columns prefixed `q_` (query) and `t_` (target):

    {q,t}_input_ids      int64 [B, T]   right-padded prompt ids
    {q,t}_attention_mask int64 [B, T]
    {q,t}_pixel_values   uint8 [B, 3, S, S]   (absent when the model uses no image, or with the feature cache)
    {q,t}_has_image      bool  [B]            (False: blank image, gate sees no vision feature)
    {q,t}_note_id        int64 [B]

`pair_batch_to_notes` lays the 2B notes out as [q_1..q_B, t_1..t_B], the layout the loss expects.
With a frozen-feature cache (`core.data.features`, `data.feature_cache`) the batch carries no
pixels; the notes get the cached encoder outputs by note id instead, and the model reads them:

    vision_patches       float32 [2B, L_p, h_v]  -> NoteLLM2(image_features=(patches, cls))
    vision_cls           float32 [2B, h_v]
    has_image            bool  [2B]              (from the cache: it decoded the images)
"""

from __future__ import annotations

import torch

from core.losses import micl_loss, pair_contrastive_loss

NOTE_KEYS = ("input_ids", "attention_mask", "pixel_values", "has_image", "note_id")


def pair_batch_to_notes(batch: dict, features=None) -> dict:
    """Concatenate the query and target sides into one note batch [q_1..q_B, t_1..t_B].

    Args:
        batch: a pair batch (layout above).
        features: a `core.data.features.FeatureCache`: add each note's cached vision features.
    """
    notes = {}
    for key in NOTE_KEYS:
        q, t = batch.get(f"q_{key}"), batch.get(f"t_{key}")
        if q is None or t is None:
            continue
        notes[key] = torch.cat([torch.as_tensor(q), torch.as_tensor(t)], dim=0)
    for key in ("input_ids", "attention_mask", "note_id"):
        if key not in notes:
            raise KeyError(f"pair batch is missing q_{key}/t_{key}; has {sorted(batch)}")
    if features is not None:
        notes = features.attach(notes)
    return trim_padding(notes)


def trim_padding(notes: dict) -> dict:
    """Drop pad columns every row shares (the pipeline pads to a fixed width for Ray Data)."""
    width = int(notes["attention_mask"].sum(dim=1).max().item())
    notes = dict(notes)
    notes["input_ids"] = notes["input_ids"][:, :width]
    notes["attention_mask"] = notes["attention_mask"][:, :width]
    return notes


def model_inputs(notes: dict, device: torch.device | str) -> dict:
    """Keyword arguments of `NoteLLM2.forward` on `device`."""
    out = {
        "input_ids": notes["input_ids"].to(device, non_blocking=True),
        "attention_mask": notes["attention_mask"].to(device, non_blocking=True),
    }
    if "vision_patches" in notes:
        out["image_features"] = (notes["vision_patches"].to(device, non_blocking=True),
                                 notes["vision_cls"].to(device, non_blocking=True))
        out["has_image"] = notes["has_image"].to(device)
    elif "pixel_values" in notes:
        out["pixel_values"] = notes["pixel_values"].to(device, non_blocking=True)
        out["has_image"] = notes.get("has_image", torch.ones(len(notes["input_ids"]), dtype=torch.bool)).to(device)
    return out


def compute_loss(embeddings, log_scale: torch.Tensor, note_ids: torch.Tensor | None, loss_cfg) -> tuple[torch.Tensor, dict]:
    """Loss and scalar metrics from the model's `NoteEmbeddings` (REFERENCE §4, §6).

    With a visual embedding (mICL) the loss is (L_v + alpha L_m) / (1 + alpha); otherwise L_m.
    """
    ids = note_ids if loss_cfg.mask_duplicates else None
    kw = {"gather": loss_cfg.gather, "max_log_scale": loss_cfg.max_log_scale}
    loss_m = pair_contrastive_loss(embeddings.multimodal, log_scale, ids, **kw)
    metrics = {"loss_m": loss_m.detach()}
    if embeddings.visual is not None:
        loss_v = pair_contrastive_loss(embeddings.visual, log_scale, ids, **kw)
        loss = micl_loss(loss_v, loss_m, loss_cfg.alpha)
        metrics["loss_v"] = loss_v.detach()
    else:
        loss = loss_m
    metrics["loss"] = loss.detach()
    metrics["temperature"] = (1.0 / log_scale.detach().float().clamp(0.0, loss_cfg.max_log_scale).exp())
    return loss, metrics


def forward_pair_batch(model, batch: dict, loss_cfg, device, features=None) -> tuple[torch.Tensor, dict]:
    """Pair batch -> loss and metrics; the training loop and its tests both call this.

    `features`: the run's `core.data.features.FeatureCache`, or None to encode the batch's pixels.
    """
    notes = pair_batch_to_notes(batch, features)
    out = model(**model_inputs(notes, device))
    # log_scale comes back from forward: under ZeRO-3 parameters are only gathered inside it
    loss, metrics = compute_loss(out, out.log_scale, notes["note_id"].to(device), loss_cfg)
    metrics["notes"] = torch.tensor(float(notes["input_ids"].shape[0]))
    return loss, metrics
