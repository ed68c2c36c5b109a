"""The one place that knows the batch layout: pair batch -> model inputs -> loss -> metrics.

A training batch (from `core.data.pipeline`, via Ray Data `iter_torch_batches`) holds one row
per related pair, each side's columns prefixed `q_` (query) and `t_` (target):

    {q,t}_input_ids      int64 [B, T]   right-padded prompt ids
    {q,t}_attention_mask int64 [B, T]
    {q,t}_pixel_values   uint8 [B, 3, S, S]   (absent when the model uses no image, or with the feature cache)
    {q,t}_has_image      bool  [B]            (False: blank image, gate sees no vision feature)
    {q,t}_note_id        int64 [B]

`pair_batch_to_notes` lays the 2B notes out as [q_1..q_B, t_1..t_B], the layout the loss expects.

With `data.hard_negatives` = K the batch also carries each pair's K mined negatives
(`rayjobs.mine_negatives`), `n_`-prefixed with a slot axis:

    n_input_ids / n_attention_mask int64 [B, K, T];  n_pixel_values uint8 [B, K, 3, S, S]
    n_has_image bool [B, K];  n_note_id int64 [B, K];  n_valid bool [B, K] (False: an empty slot,
                                                        filled with the pair's query note)

and the notes become [q_1..q_B, t_1..t_B, n_1,1..n_1,K, .., n_B,K]: the last B*K rows are extra
candidate columns of the loss for every row (`core.losses.pair_contrastive_loss(negatives=)`),
with note id -1 for empty slots.

A training step is `start_pair_step` (forward + loss, returning a `backward` to call once the
loss is known to be finite): one forward with graph, or with `loss.grad_cache_chunk_size` = N
the GradCache passes of `core.grad_cache` over chunks of N pairs (rows q_s..q_e and t_s..t_e).
With a frozen-feature cache (`core.data.features`, `data.feature_cache`) the batch carries no
pixels; the notes get the cached encoder outputs by note id instead, and the model reads them:

    vision_patches       float32 [2B, L_p, h_v]  -> NoteLLM2(image_features=(patches, cls))
    vision_cls           float32 [2B, h_v]
    has_image            bool  [2B]              (from the cache: it decoded the images)
"""

from __future__ import annotations

import torch

from core import grad_cache
from core.losses import matryoshka_loss, micl_loss, pair_contrastive_loss
from core.model.notellm2 import NoteEmbeddings

NOTE_KEYS = ("input_ids", "attention_mask", "pixel_values", "has_image", "note_id")


def pair_batch_to_notes(batch: dict, features=None) -> dict:
    """Concatenate the query and target sides into one note batch [q_1..q_B, t_1..t_B].

    Args:
        batch: a pair batch (layout above).
        features: a `core.data.features.FeatureCache`: add each note's cached vision features.
    """
    notes = {}
    negatives = "n_note_id" in batch
    for key in NOTE_KEYS:
        q, t = batch.get(f"q_{key}"), batch.get(f"t_{key}")
        if q is None or t is None:
            continue
        sides = [torch.as_tensor(q), torch.as_tensor(t)]
        if negatives:  # [B, K, ...] -> [B*K, ...], pair-major (the slots of pair 1 first)
            n = torch.as_tensor(batch[f"n_{key}"])
            sides.append(n.reshape(-1, *n.shape[2:]))
        notes[key] = torch.cat(sides, dim=0)
    for key in ("input_ids", "attention_mask", "note_id"):
        if key not in notes:
            raise KeyError(f"pair batch is missing q_{key}/t_{key}; has {sorted(batch)}")
    if features is not None:
        notes = features.attach(notes)  # by the filler's id for empty slots: they have features
    notes["num_negatives"] = 0
    if negatives:
        valid = torch.as_tensor(batch["n_valid"]).reshape(-1)  # [B*K]
        pair_rows = notes["note_id"].shape[0] - valid.shape[0]
        notes["note_id"] = notes["note_id"].clone()
        notes["note_id"][pair_rows:][~valid] = -1  # an empty slot is no candidate
        notes["num_negatives"] = int(valid.shape[0])
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


def compute_loss(embeddings, log_scale: torch.Tensor, note_ids: torch.Tensor | None, loss_cfg,
                 num_negatives: int = 0) -> tuple[torch.Tensor, dict]:
    """Loss and scalar metrics from the model's `NoteEmbeddings` (REFERENCE §4, §6).

    With a visual embedding (mICL) the loss is (L_v + alpha L_m) / (1 + alpha); otherwise L_m.
    With `loss_cfg.matryoshka_dims` each of L_v, L_m is `core.losses.matryoshka_loss`.
    `num_negatives`: the last rows of each embedding (and of `note_ids`, -1 = empty slot) are
    hard negatives, candidates only (layout: module docstring).
    """
    if num_negatives and note_ids is None:
        raise ValueError("compute_loss with hard negatives needs note_ids (-1 marks an empty slot)")
    split = (note_ids.shape[0] if note_ids is not None else embeddings.multimodal.shape[0]) - num_negatives
    neg_ids = note_ids[split:] if num_negatives else None
    ids = note_ids[:split] if loss_cfg.mask_duplicates and note_ids is not None else None
    kw = {"gather": loss_cfg.gather, "max_log_scale": loss_cfg.max_log_scale}

    def contrastive(emb):
        if num_negatives:
            kw.update(negatives=emb[split:], negative_ids=neg_ids)
        emb = emb[:split]  # [2B, d]
        if loss_cfg.matryoshka_dims:  # sum over the trained prefixes (each normalised on its own)
            return matryoshka_loss(emb, log_scale, loss_cfg.matryoshka_dims, loss_cfg.matryoshka_weights, ids, **kw)
        return pair_contrastive_loss(emb, log_scale, ids, **kw)

    loss_m = contrastive(embeddings.multimodal)
    metrics = {"loss_m": loss_m.detach()}
    if embeddings.visual is not None:
        loss_v = contrastive(embeddings.visual)
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
    loss, metrics = compute_loss(out, out.log_scale, notes["note_id"].to(device), loss_cfg, notes["num_negatives"])
    metrics["notes"] = torch.tensor(float(notes["input_ids"].shape[0]))
    return loss, metrics


def start_pair_step(model, batch: dict, loss_cfg, device, features=None) -> tuple[torch.Tensor, dict, callable]:
    """Forward and loss of one training step, and the `backward` that completes it.

    Returns:
        (loss, metrics, backward). `backward(run_backward=None, set_boundary=None)` back-propagates
        the step (DeepSpeed: `backward(engine.backward, engine.set_gradient_accumulation_boundary)`);
        call it only after deciding to take the step (e.g. the loss is finite). With
        `loss_cfg.grad_cache_chunk_size` the loss is computed graph-free and `backward` replays
        the chunks; the resulting gradients equal the plain step's. `features`: the run's
        `core.data.features.FeatureCache`, or None to encode the batch's pixels.
    """
    if not getattr(loss_cfg, "grad_cache_chunk_size", 0):
        loss, metrics = forward_pair_batch(model, batch, loss_cfg, device, features)

        def backward(run_backward=None, set_boundary=None):
            (run_backward or torch.Tensor.backward)(loss)

        return loss, metrics, backward
    return _grad_cache_step(model, batch, loss_cfg, device, features)


def pair_chunks(n_pairs: int, chunk_pairs: int, negatives_per_pair: int = 0) -> list[torch.Tensor]:
    """Row indices of each chunk of `chunk_pairs` pairs in the [q_1..q_B, t_1..t_B, n_1,1..n_B,K]
    layout: a chunk holds its pairs' query, target and hard-negative rows."""
    k, base = negatives_per_pair, 2 * n_pairs
    return [torch.cat([torch.arange(s, min(s + chunk_pairs, n_pairs)),
                       torch.arange(n_pairs + s, n_pairs + min(s + chunk_pairs, n_pairs)),
                       torch.arange(base + s * k, base + min(s + chunk_pairs, n_pairs) * k)])
            for s in range(0, n_pairs, chunk_pairs)]


def _grad_cache_step(model, batch: dict, loss_cfg, device, features=None):
    """GradCache passes (`core.grad_cache`) over chunks of `loss_cfg.grad_cache_chunk_size` pairs."""
    notes = pair_batch_to_notes(batch, features)  # padding trimmed once for the whole batch, as unchunked
    n_rows, n_neg = notes["input_ids"].shape[0], notes["num_negatives"]
    n_pairs = (n_rows - n_neg) // 2
    inputs = model_inputs(notes, device)
    chunks = pair_chunks(n_pairs, int(loss_cfg.grad_cache_chunk_size), n_neg // n_pairs)

    def take(v, rows):  # cached vision features come as a (patches, cls) pair
        return tuple(take(x, rows) for x in v) if isinstance(v, tuple) else v[rows.to(v.device)]

    def embed(rows):
        out = model(**{k: take(v, rows) for k, v in inputs.items()})
        return out.multimodal, out.visual, out.log_scale

    outputs, states = grad_cache.embed_without_graph(embed, chunks, device)
    multimodal = grad_cache.scatter_rows([o[0] for o in outputs], chunks, n_rows)  # [2B, d]
    visual = grad_cache.scatter_rows([o[1] for o in outputs], chunks, n_rows)  # [2B, d] or None
    note_ids = notes["note_id"].to(device)

    def loss_fn(mm, vis, tau):
        return compute_loss(NoteEmbeddings(mm, vis, tau), tau, note_ids, loss_cfg, n_neg)

    loss, metrics, (g_mm, g_vis, g_tau) = grad_cache.loss_and_grads(loss_fn, [multimodal, visual, outputs[0][2]])
    metrics["notes"] = torch.tensor(float(n_rows))

    def surrogate(i, rows, out):
        mm, vis, tau = out
        rows = rows.to(g_mm.device)
        total = (mm.float() * g_mm[rows]).sum()
        if vis is not None and g_vis is not None:
            total = total + (vis.float() * g_vis[rows]).sum()
        if i == 0 and tau.requires_grad and g_tau is not None:
            total = total + (tau.float() * g_tau).sum()  # tau is shared: its gradient enters once
        return total

    def backward(run_backward=None, set_boundary=None):
        grad_cache.replay_with_graph(embed, chunks, states, surrogate, device, run_backward, set_boundary)

    return loss, metrics, backward
