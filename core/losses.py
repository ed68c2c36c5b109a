"""In-batch contrastive loss over related note pairs (REFERENCE §6) and mICL mixing (§4).

The math takes plain embedding tensors, never the model, so it is testable on random tensors.
Cross-worker negatives go through `core.distributed.gather_embeddings`, the identity without a
process group: single-process and multi-worker runs share this code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.distributed import gather_embeddings

MASK_VALUE = -1e12  # official code's diagonal mask; finite so an all-masked row cannot make NaN


def pair_positions(n_rows: int, device=None) -> torch.Tensor:
    """Positive column of each row in a [q_1..q_B, t_1..t_B] block: q_i <-> t_i."""
    if n_rows % 2:
        raise ValueError(f"pair batch must have an even number of rows (2B), got {n_rows}")
    half = n_rows // 2
    idx = torch.arange(n_rows, device=device)
    return torch.where(idx < half, idx + half, idx - half)


def pair_contrastive_loss(
    embeddings: torch.Tensor,
    log_scale: torch.Tensor,
    note_ids: torch.Tensor | None = None,
    *,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    gather: str = "no_grad",
    max_log_scale: float | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over [q_1..q_B, t_1..t_B] with every other gathered note as a negative.

    Args:
        embeddings: [2B, d] un-normalised note embeddings laid out [q_1..q_B, t_1..t_B].
        log_scale: scalar tensor tau; logits are cos-similarities times e^tau.
        note_ids: optional int [2B]; a column holding the same note as the row itself or the row's
            positive (other than the positive) is dropped from the denominator.
        negatives: optional [N, d] un-normalised hard-negative embeddings (`data.hard_negatives`):
            extra candidate columns for every row (gathered across workers like the pairs),
            never rows of their own.
        negative_ids: int [N] note ids of `negatives`; -1 marks an empty slot (a pair with fewer
            mined negatives), masked for every row. With `note_ids`, a negative that is the
            row's own note or its positive is masked like an in-batch duplicate.
        gather: cross-worker mode of `gather_embeddings` (`none`, `no_grad`, `with_grad`).
        max_log_scale: clamp tau to [0, max_log_scale] (None: no clamp).

    Returns:
        Scalar: mean cross-entropy over all 2B * world rows (the same value on every worker).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [2B, d], got shape {tuple(embeddings.shape)}")
    n_local = embeddings.shape[0]
    emb = F.normalize(embeddings.float(), dim=-1)
    emb, _ = gather_embeddings(emb, gather)  # [M, d], M = 2B * world
    world = emb.shape[0] // n_local
    # Each worker's block is [q..., t...]; positives live inside the same block.
    positives = (pair_positions(n_local, emb.device).repeat(world)
                 + torch.arange(world, device=emb.device).repeat_interleave(n_local) * n_local)  # [M]

    tau = log_scale.float()
    if max_log_scale is not None:
        tau = tau.clamp(0.0, max_log_scale)
    sims = emb @ emb.T  # [M, M]
    masked = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    id_gather = "no_grad" if gather != "none" else "none"
    col_ids = None  # note id of every column, when known: [M] or [M + N * world]
    if negatives is not None:
        neg = F.normalize(negatives.float(), dim=-1)
        neg, _ = gather_embeddings(neg, gather)  # [Nw, d], Nw = N * world
        sims = torch.cat([sims, emb @ neg.T], dim=1)  # [M, M + Nw]
        masked = torch.cat([masked, torch.zeros(masked.shape[0], neg.shape[0], dtype=torch.bool, device=masked.device)], dim=1)
        if negative_ids is not None:
            if negative_ids.shape[0] != negatives.shape[0]:
                raise ValueError(f"negative_ids must have {negatives.shape[0]} entries, got {negative_ids.shape[0]}")
            nids, _ = gather_embeddings(negative_ids.reshape(-1, 1), id_gather)
            nids = nids.reshape(-1)  # [Nw]
            masked[:, emb.shape[0]:] |= (nids < 0)[None, :]  # empty slots are nobody's candidate
            col_ids = nids
        elif note_ids is not None:
            raise ValueError("duplicate masking with hard negatives needs their negative_ids")
    if note_ids is not None:
        if note_ids.shape[0] != n_local:
            raise ValueError(f"note_ids must have {n_local} entries, got {note_ids.shape[0]}")
        ids, _ = gather_embeddings(note_ids.reshape(-1, 1), id_gather)
        ids = ids.reshape(-1)  # [M]
        col_ids = ids if col_ids is None else torch.cat([ids, col_ids])  # [M] or [M + Nw]
        same_as_row = col_ids[None, :] == ids[:, None]
        same_as_pos = col_ids[None, :] == ids[positives][:, None]
        dup = same_as_row | same_as_pos
        dup[torch.arange(dup.shape[0], device=dup.device), positives] = False  # keep the positive
        masked = masked | dup
    logits = (sims * tau.exp()).masked_fill(masked, MASK_VALUE)
    return F.cross_entropy(logits, positives)


def micl_loss(loss_v: torch.Tensor, loss_m: torch.Tensor, alpha: float) -> torch.Tensor:
    """mICL mixing (REFERENCE §4): (L_v + alpha * L_m) / (1 + alpha)."""
    return (loss_v + alpha * loss_m) / (1.0 + alpha)


def matryoshka_loss(
    embeddings: torch.Tensor,
    log_scale: torch.Tensor,
    dims,
    weights=None,
    note_ids: torch.Tensor | None = None,
    *,
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    gather: str = "no_grad",
    max_log_scale: float | None = None,
) -> torch.Tensor:
    """Matryoshka contrastive loss: sum_i w_i * pair_contrastive_loss(embeddings[:, :d_i]).

    Each leading prefix of the un-normalised embedding is normalised on its own (inside
    `pair_contrastive_loss`), so every prefix is a retrieval embedding in its own right: one
    model deploys at any of the trained widths by truncating and re-normalising.

    Args:
        embeddings: [2B, d] un-normalised note embeddings laid out [q_1..q_B, t_1..t_B].
        log_scale: scalar tau shared by every prefix.
        dims: increasing prefix widths, each <= d (e.g. [8, 16, 32, 64]).
        weights: one weight per dim (None: all 1).
        note_ids: optional int [2B] for duplicate masking (as in `pair_contrastive_loss`).
        negatives, negative_ids: hard negatives as in `pair_contrastive_loss` (prefixed alike).
        gather, max_log_scale: as in `pair_contrastive_loss`.

    Returns:
        Scalar weighted sum of the per-prefix losses.
    """
    dims = [int(d) for d in dims]
    if not dims:
        raise ValueError("matryoshka_loss needs at least one dimension")
    if dims[-1] > embeddings.shape[-1]:
        raise ValueError(f"matryoshka dims {dims} exceed the embedding width {embeddings.shape[-1]}")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims")
    total = None
    for d, w in zip(dims, weights):
        term = w * pair_contrastive_loss(embeddings[:, :d], log_scale, note_ids, gather=gather,
                                         negatives=None if negatives is None else negatives[:, :d],
                                         negative_ids=negative_ids, max_log_scale=max_log_scale)
        total = term if total is None else total + term
    return total
