"""Note embeddings for evaluation: the modality ablation's view of a batch and the one
`embed_batch` that the in-process loop (`embed_notes_local`, training validation) and the Ray
Data actors of `rayjobs.evaluate` / `rayjobs.embed` share, so both paths give the same embeddings.

Modality ablation (paper Table 2), applied to preprocessed batches by `apply_modality`:
`image` blanks the note text (title, topics and content empty; the prompt template stays),
`text` replaces the image by a blank one that still goes through encoder, connector and gate
(as the official code does, so a fused model sees the input kind it was trained on), `both`
leaves the note alone.

    ids, emb = embed_notes_local(model, notes, "cpu", batch_size=32, modality="text")
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from core.config import MODALITIES

EMBEDDINGS = ("multimodal", "visual", "image-features")


def prefix_embeddings(embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
    """A Matryoshka prefix: the first `dim` coordinates of each row, L2-normalised (None: unchanged)."""
    if dim is None:
        return embeddings
    if not 1 <= int(dim) <= embeddings.shape[-1]:
        raise ValueError(f"dim {dim}: allowed 1..{embeddings.shape[-1]} (the embedding width)")
    return F.normalize(embeddings[..., : int(dim)].float(), dim=-1)



def blank_text_prompt(tokenizer, model_cfg) -> np.ndarray:
    """Token ids of a note whose title, topics and content are all empty (int64 [T0])."""
    from core.prompts import tokenize_notes

    return tokenize_notes(tokenizer, [{}], model_cfg)["input_ids"][0]


def apply_modality(batch: Mapping, modality: str, blank_ids: np.ndarray | None = None, pad_id: int = 0,
                   blank_features=None) -> dict:
    """The ablation's view of a preprocessed note batch (numpy arrays or tensors).

    Args:
        batch: note columns (input_ids, attention_mask, pixel_values, has_image, text_chars, ...).
        modality: `both` (unchanged), `image` (text blanked) or `text` (a blank image in place of
            the note's, through encoder, connector and gate).
        blank_ids: `blank_text_prompt(...)`, required for `image`: every row becomes that prompt,
            so the image placeholders stay where the template puts them.
        pad_id: pad token id used when the blank prompt is shorter than the batch width.
        blank_features: the blank image's cached (patches [L_p, h_v], cls [h_v]), required for
            `text` when the batch carries cached features (`FeatureCache.blank`).

    Returns:
        A new dict; inputs are not modified.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: allowed {', '.join(MODALITIES)}")
    out = dict(batch)
    if modality == "both":
        return out
    n = len(batch["input_ids"])
    if modality == "text":
        # Official: a blank image still goes through encoder, connector and gate, so a fused model
        # sees the kind of input it was trained on (has_image False would skip the gate instead).
        if "vision_patches" in out:
            if blank_features is None:
                raise ValueError("modality='text' on cached features needs blank_features = FeatureCache.blank")
            out["vision_patches"] = blank_features[0].expand(n, -1, -1)  # [N, L_p, h_v]
            out["vision_cls"] = blank_features[1].expand(n, -1)  # [N, h_v]
            out["has_image"] = np.ones(n, dtype=bool)
        elif "pixel_values" in out:
            out["pixel_values"] = np.zeros_like(np.asarray(out["pixel_values"]))
            out["has_image"] = np.ones(n, dtype=bool)
        else:
            out["has_image"] = np.zeros(n, dtype=bool)
        return out
    if blank_ids is None:
        raise ValueError("modality='image' needs blank_ids = blank_text_prompt(tokenizer, model_cfg)")
    width = max(int(np.asarray(batch["input_ids"]).shape[1]), len(blank_ids))
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    ids[:, : len(blank_ids)] = blank_ids
    mask[:, : len(blank_ids)] = 1
    out["input_ids"], out["attention_mask"] = ids, mask
    if "text_chars" in out:
        out["text_chars"] = np.zeros(n, dtype=np.int64)
    return out


def _as_tensors(batch: Mapping) -> dict:
    keep = ("note_id", "input_ids", "attention_mask", "pixel_values", "has_image", "vision_patches", "vision_cls")
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k in keep}


def image_features(vision, pixel_values: torch.Tensor) -> torch.Tensor:
    """Raw frozen vision CLS features of uint8 images [N, 3, S, S] -> float32 [N, h_v].

    The no-training baseline of `rayjobs.evaluate --baseline image-features`; `vision` is a
    `core.model.vision` encoder (`patches, cls = vision(pixel_values)`).
    """
    _, cls = vision(pixel_values)  # [N, L_p, h_v], [N, h_v]
    return cls.float()


@torch.no_grad()
def embed_batch(model, batch: Mapping, device, kind: str = "multimodal", dim: int | None = None) -> torch.Tensor:
    """One preprocessed note batch -> float32 [N, d] embeddings on the CPU (un-normalised), or with
    `dim` the Matryoshka prefix [N, dim] (truncated, then L2-normalised: `prefix_embeddings`).

    Args:
        model: a NoteLLM-2 model (or, for kind=`image-features`, anything with a `.vision` encoder
            or a vision encoder itself).
        batch: note columns as numpy arrays or tensors (padding is trimmed here).
        device: where the forward runs.
        kind: `multimodal` (the protocol's note embedding), `visual` (mICL visual slot) or
            `image-features` (raw vision features, baseline).
    """
    from core.step import model_inputs, trim_padding

    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding kind {kind!r}: allowed {', '.join(EMBEDDINGS)}")
    notes = _as_tensors(batch)
    if kind == "image-features":
        if "vision_cls" in notes:  # the feature cache holds exactly these
            return notes["vision_cls"].float().cpu()
        vision = getattr(model, "vision", model)
        if vision is None or "pixel_values" not in notes:
            raise ValueError("the image-features baseline needs a model config with a vision encoder "
                             "(prompt_mode basic/micl, or late_fusion on)")
        return image_features(vision, notes["pixel_values"].to(device)).cpu()
    out = model(**model_inputs(trim_padding(notes), device))
    emb = out.multimodal if kind == "multimodal" else out.visual
    if emb is None:
        raise ValueError("this model has no visual embedding (prompt_mode is not micl)")
    return prefix_embeddings(emb.float(), dim).cpu()  # [N, d] (or [N, dim])


def _iter_batches(notes, batch_size: int):
    """Yield batches of at most `batch_size` rows from a column dict or a list of column dicts."""
    batches = [notes] if isinstance(notes, Mapping) else list(notes)
    for b in batches:
        n = len(b["input_ids"])
        for s in range(0, n, batch_size):
            yield {k: v[s: s + batch_size] for k, v in b.items()}


def embed_notes_local(model, notes, device="cpu", batch_size: int = 32, *, kind: str = "multimodal",
                      modality: str = "both", blank_ids: np.ndarray | None = None, pad_id: int = 0, features=None):
    """Embed preprocessed notes in this process (training-loop validation, tests).

    Args:
        model: NoteLLM-2 model (already on `device`); put in eval mode for the call and restored.
        notes: a dict of columns (note_id, input_ids, attention_mask, pixel_values, has_image) as
            tensors/arrays, or a list of such batches.
        device: forward device.
        batch_size: notes per forward.
        kind: see `embed_batch`.
        modality, blank_ids, pad_id: the ablation, see `apply_modality`.
        features: a `core.data.features.FeatureCache`: cached vision features instead of pixels.

    Returns:
        (note_ids int64 [N], embeddings float32 [N, d]) on the CPU, in input order.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ids, embs = [], []
    try:
        for batch in _iter_batches(notes, batch_size):
            batch = features.attach(batch) if features is not None else batch
            batch = apply_modality(batch, modality, blank_ids, pad_id, features.blank if features is not None else None)
            ids.append(torch.as_tensor(np.asarray(batch["note_id"])).long())
            embs.append(embed_batch(model, batch, device, kind))
    finally:
        if was_training:
            model.train()
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(ids), torch.cat(embs)
