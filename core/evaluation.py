"""The I2I evaluation protocol (REFERENCE §7): pool, subsets, Recall@K, modality ablation, tables.

Protocol (official): the test pairs are already greedily deduplicated so each note appears once.
Queries are the pairs' query notes, targets their target notes, and the candidate pool is every
test note minus the query notes; each query ranks the pool by the dot product of L2-normalised
embeddings. Recall@K is reported for three subsets: all pairs, pairs with a short query, pairs
with a short target (`short_*` flags in pairs_test.parquet, threshold `data.short_text_chars`).

    protocol = build_protocol(pairs_df)                         # pool = test notes - queries
    metrics, per_query = evaluate_embeddings(ids, emb, protocol, ks=[100, 1000])
    # {"all": {"R@100": 0.75, "R@1000": None}, "short_query": {...}, "short_target": {...},
    #  "num_queries": 812, "num": {"all": 812, "short_query": 97, ...}, "pool_size": 812}

The training loop calls `validation_recall(model, data_dir, run_cfg, device)`, which preprocesses
and embeds in-process (no Ray); `rayjobs.evaluate` embeds with Ray Data actors. Both go through
`embed_batch`, so the two paths give the same embeddings.

Modality ablation (paper Table 2), applied to preprocessed batches by `apply_modality`:
`image` blanks the note text (title, topics and content empty; the prompt template stays),
`text` removes the image (has_image False, zero pixels), `both` leaves the note alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.config import MODALITIES
from core.metrics import approximate_target_ranks, format_recall, recall_report, target_ranks

log = logging.getLogger(__name__)

SUBSETS = ("all", "short_query", "short_target")
POOLS = ("test", "all")
EMBEDDINGS = ("multimodal", "visual", "image-features")


# ---------------------------------------------------------------------------------------------
# Protocol: which notes are queries, targets and candidates
# ---------------------------------------------------------------------------------------------


@dataclass
class Protocol:
    """Queries, their targets and subset flags (aligned arrays [Q]) plus the candidate pool [P]."""

    query_ids: np.ndarray
    target_ids: np.ndarray
    short_query: np.ndarray
    short_target: np.ndarray
    pool_ids: np.ndarray
    dropped_pairs: int = 0
    """Pairs removed because their target was itself a query (impossible after greedy dedupe)."""

    @property
    def num_queries(self) -> int:
        return int(len(self.query_ids))

    def needed_ids(self) -> np.ndarray:
        """Every note that must be embedded: queries and the pool, sorted, unique."""
        return np.union1d(self.query_ids, self.pool_ids).astype(np.int64)

    def subset_mask(self, subset: str) -> np.ndarray:
        if subset == "all":
            return np.ones(self.num_queries, dtype=bool)
        if subset in ("short_query", "short_target"):
            return getattr(self, subset).astype(bool)
        raise ValueError(f"subset {subset!r}: allowed {', '.join(SUBSETS)}")


def build_protocol(pairs, pool: str = "test", all_note_ids: Iterable[int] | None = None,
                   max_queries: int | None = None) -> Protocol:
    """Queries, targets and the candidate pool from the test pairs.

    Args:
        pairs: a pandas DataFrame (or anything `pd.DataFrame` accepts) with query_id, target_id,
            short_query, short_target; one row per deduplicated test pair.
        pool: `test` (official: all test notes minus the queries) or `all` (every note in
            `all_note_ids` minus the queries: a larger, harder pool).
        all_note_ids: note ids of the whole corpus; required for pool=`all`.
        max_queries: keep only the first N pairs (file order) for a cheap validation signal; the
            pool is then built from those pairs, so values are comparable only at equal N.

    Returns:
        A `Protocol`.
    """
    import pandas as pd

    df = pd.DataFrame(pairs)
    missing = {"query_id", "target_id"} - set(df.columns)
    if missing:
        raise ValueError(f"test pairs lack columns {sorted(missing)}; have {list(df.columns)}")
    if max_queries is not None:
        df = df.iloc[: int(max_queries)]
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: allowed {', '.join(POOLS)}")
    query_ids = df["query_id"].to_numpy(np.int64)
    target_ids = df["target_id"].to_numpy(np.int64)
    if pool == "test":
        notes = np.union1d(query_ids, target_ids)
    else:
        if all_note_ids is None:
            raise ValueError("pool='all' needs all_note_ids")
        notes = np.unique(np.asarray(list(all_note_ids), dtype=np.int64))
    pool_ids = np.setdiff1d(notes, query_ids)  # sorted, unique
    keep = np.isin(target_ids, pool_ids)
    dropped = int((~keep).sum())
    if dropped:
        log.warning("%d test pairs dropped: their target is also a query (pairs not deduplicated?)", dropped)

    def flag(name: str) -> np.ndarray:
        return df[name].to_numpy(bool)[keep] if name in df.columns else np.zeros(int(keep.sum()), dtype=bool)

    return Protocol(query_ids[keep], target_ids[keep], flag("short_query"), flag("short_target"), pool_ids, dropped)


# ---------------------------------------------------------------------------------------------
# Scoring embeddings under the protocol
# ---------------------------------------------------------------------------------------------


def _rows_of(ids: np.ndarray, sorted_ids: np.ndarray, order: np.ndarray, what: str) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    if not found.all():
        missing = ids[~found]
        raise KeyError(f"{len(missing)} {what} notes have no embedding, e.g. note_id {int(missing[0])}")
    return order[pos]


def evaluate_embeddings(
    note_ids: Sequence[int] | np.ndarray | torch.Tensor,
    embeddings: torch.Tensor | np.ndarray,
    protocol: Protocol,
    ks: Iterable[int],
    chunk_size: int = 8192,
    normalize: bool = True,
    index: str = "exact",
    exact_check_queries: int = 2000,
    **index_kwargs,
):
    """Recall@K per subset for embeddings of (at least) every query and pool note.

    Args:
        note_ids: int [N] ids of the embedding rows.
        embeddings: float [N, d].
        protocol: from `build_protocol`.
        ks: Recall@K cut-offs; K beyond the pool is reported as None.
        chunk_size: candidates scored at a time (bounded memory, exact ranks).
        normalize: L2-normalise before the dot product (the protocol's similarity).
        index: `exact` (chunked exact ranks) or a FAISS index kind, `hnsw` / `ivf`, for pools in
            the millions; approximate ranks stop at max(ks) (a rank of max(ks) = not retrieved).
        exact_check_queries: with a FAISS index, also rank this many queries (a seeded sample)
            exactly and report `approx_check`: exact and approximate Recall@K on that sample and
            their difference, `recall_loss` (0 skips the check).
        **index_kwargs: FAISS settings (`ef_search`, `nprobe`, ...; see core.metrics).

    Returns:
        (metrics, per_query): metrics = {"all"|"short_query"|"short_target": {"R@K": float|None},
        "num_queries", "num": {subset: count}, "pool_size"}; per_query a pandas DataFrame with
        query_id, target_id, rank, short_query, short_target (rank 0 = target ranked first).
    """
    import pandas as pd

    ks = sorted({int(k) for k in ks})
    ids = torch.as_tensor(np.asarray(note_ids)).long().numpy()
    emb = torch.as_tensor(embeddings).float()  # [N, d]
    if emb.dim() != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings {tuple(emb.shape)} do not match {len(ids)} note ids")
    if normalize:
        emb = F.normalize(emb, dim=-1)
    if len(emb) > 1 and float((emb - emb[:1]).abs().max()) < 1e-6:
        log.warning("all %d embeddings are identical: every candidate ties with the target, so each rank is 0 "
                    "under the strictly-higher rule and recall reads 1.0 without meaning anything", len(emb))
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    query_rows = _rows_of(protocol.query_ids, sorted_ids, order, "query")
    pool_rows = _rows_of(protocol.pool_ids, sorted_ids, order, "pool")
    # pool_ids is sorted, so a target's pool row is a binary search away
    target_index = torch.from_numpy(np.searchsorted(protocol.pool_ids, protocol.target_ids)).long()
    queries, pool = emb[torch.from_numpy(query_rows)], emb[torch.from_numpy(pool_rows)]  # [Q, d], [P, d]
    pool_size = int(len(protocol.pool_ids))
    approx_check = None
    if index == "exact":
        ranks = target_ranks(queries, pool, target_index, chunk_size=chunk_size)  # [Q]
    else:
        max_k = min(max(ks), pool_size)
        ranks = torch.from_numpy(approximate_target_ranks(queries, pool, target_index, max_k, index, **index_kwargs))
        approx_check = _approx_check(queries, pool, target_index, ranks, ks, pool_size, chunk_size, exact_check_queries)
    metrics: dict = {}
    num = {}
    for subset in SUBSETS:
        mask = torch.from_numpy(protocol.subset_mask(subset))
        metrics[subset] = recall_report(ranks[mask], ks, pool_size)
        num[subset] = int(mask.sum())
    metrics["num_queries"] = protocol.num_queries
    metrics["num"] = num
    metrics["pool_size"] = pool_size
    if protocol.dropped_pairs:
        metrics["dropped_pairs"] = protocol.dropped_pairs
    if approx_check is not None:
        metrics["approx_check"] = approx_check
    per_query = pd.DataFrame({
        "query_id": protocol.query_ids, "target_id": protocol.target_ids, "rank": ranks.numpy(),
        "short_query": protocol.short_query, "short_target": protocol.short_target,
    })
    return metrics, per_query


def _approx_check(queries, pool, target_index, approx_ranks, ks, pool_size: int, chunk_size: int, n: int) -> dict | None:
    """Exact vs approximate Recall@K on a seeded sample of the queries (what the index costs)."""
    if n <= 0 or not len(queries):
        return None
    sample = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(queries))[:n]))
    exact = target_ranks(queries[sample], pool, target_index[sample], chunk_size=chunk_size)
    exact_r, approx_r = recall_report(exact, ks, pool_size), recall_report(approx_ranks[sample], ks, pool_size)
    loss = {k: (exact_r[k] - approx_r[k]) if exact_r[k] is not None and approx_r[k] is not None else None for k in exact_r}
    return {"queries": int(len(sample)), "exact": exact_r, "approximate": approx_r, "recall_loss": loss}


def flatten_metrics(metrics: Mapping) -> dict[str, float]:
    """{"all/R@100": 0.75, ...}: the `<subset>/R@<k>` names `EvalConfig.metric` uses (None dropped)."""
    return {f"{s}/{key}": float(v) for s in SUBSETS for key, v in (metrics.get(s) or {}).items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Modality ablation and embedding (shared by the in-process loop and the Ray Data actors)
# ---------------------------------------------------------------------------------------------


def blank_text_prompt(tokenizer, model_cfg) -> np.ndarray:
    """Token ids of a note whose title, topics and content are all empty (int64 [T0])."""
    from core.prompts import tokenize_notes

    return tokenize_notes(tokenizer, [{}], model_cfg)["input_ids"][0]


def apply_modality(batch: Mapping, modality: str, blank_ids: np.ndarray | None = None, pad_id: int = 0) -> dict:
    """The ablation's view of a preprocessed note batch (numpy arrays or tensors).

    Args:
        batch: note columns (input_ids, attention_mask, pixel_values, has_image, text_chars, ...).
        modality: `both` (unchanged), `image` (text blanked) or `text` (image removed).
        blank_ids: `blank_text_prompt(...)`, required for `image`: every row becomes that prompt,
            so the image placeholders stay where the template puts them.
        pad_id: pad token id used when the blank prompt is shorter than the batch width.

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
        if "pixel_values" in out:
            out["pixel_values"] = np.zeros_like(np.asarray(out["pixel_values"]))
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
    keep = ("note_id", "input_ids", "attention_mask", "pixel_values", "has_image")
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
def embed_batch(model, batch: Mapping, device, kind: str = "multimodal") -> torch.Tensor:
    """One preprocessed note batch -> float32 [N, d] embeddings on the CPU.

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
        vision = getattr(model, "vision", model)
        if vision is None or "pixel_values" not in notes:
            raise ValueError("the image-features baseline needs a model config with a vision encoder "
                             "(prompt_mode basic/micl, or late_fusion on)")
        return image_features(vision, notes["pixel_values"].to(device)).cpu()
    out = model(**model_inputs(trim_padding(notes), device))
    emb = out.multimodal if kind == "multimodal" else out.visual
    if emb is None:
        raise ValueError("this model has no visual embedding (prompt_mode is not micl)")
    return emb.float().cpu()  # [N, d]


def _iter_batches(notes, batch_size: int):
    """Yield batches of at most `batch_size` rows from a column dict or a list of column dicts."""
    batches = [notes] if isinstance(notes, Mapping) else list(notes)
    for b in batches:
        n = len(b["input_ids"])
        for s in range(0, n, batch_size):
            yield {k: v[s: s + batch_size] for k, v in b.items()}


def embed_notes_local(model, notes, device="cpu", batch_size: int = 32, *, kind: str = "multimodal",
                      modality: str = "both", blank_ids: np.ndarray | None = None, pad_id: int = 0):
    """Embed preprocessed notes in this process (training-loop validation, tests).

    Args:
        model: NoteLLM-2 model (already on `device`); put in eval mode for the call and restored.
        notes: a dict of columns (note_id, input_ids, attention_mask, pixel_values, has_image) as
            tensors/arrays, or a list of such batches.
        device: forward device.
        batch_size: notes per forward.
        kind: see `embed_batch`.
        modality, blank_ids, pad_id: the ablation, see `apply_modality`.

    Returns:
        (note_ids int64 [N], embeddings float32 [N, d]) on the CPU, in input order.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ids, embs = [], []
    try:
        for batch in _iter_batches(notes, batch_size):
            batch = apply_modality(batch, modality, blank_ids, pad_id)
            ids.append(torch.as_tensor(np.asarray(batch["note_id"])).long())
            embs.append(embed_batch(model, batch, device, kind))
    finally:
        if was_training:
            model.train()
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(ids), torch.cat(embs)


# ---------------------------------------------------------------------------------------------
# In-process data loading (no Ray) for validation
# ---------------------------------------------------------------------------------------------


def read_test_pairs(data_dir: str):
    """pairs_test.parquet as a pandas DataFrame (local path, NFS, s3:// or gs://)."""
    from core.data.schema import PAIRS_FILES, data_path, read_table

    return read_table(data_path(data_dir, PAIRS_FILES["test"])).to_pandas()


def read_notes(data_dir: str, note_ids: Iterable[int] | None = None, columns: list[str] | None = None):
    """notes.parquet (optionally only `note_ids`, only `columns`) as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from core.data.schema import NOTES_FILE, data_path, read_table

    table = read_table(data_path(data_dir, NOTES_FILE), columns=columns)
    if note_ids is not None:
        wanted = pa.array(np.asarray(list(note_ids), dtype=np.int64))
        table = table.filter(pc.is_in(table["note_id"], value_set=wanted))
    return table


def preprocess_notes_local(notes, preprocessor, batch_size: int = 256) -> dict:
    """Raw notes (pyarrow Table) -> one column dict, through the data pipeline's own transform.

    Args:
        notes: raw note rows (`read_notes`).
        preprocessor: a `core.data.pipeline.NotePreprocessor` (the callable Ray Data actors run).
        batch_size: notes per call (bounds the decoded-pixel memory of one call).
    """
    parts = [preprocessor(notes.slice(i, batch_size)) for i in range(0, notes.num_rows, batch_size)]
    if not parts:
        raise ValueError("no notes to preprocess")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def check_modality(model_cfg, modality: str) -> None:
    """Refuse `image` (text blanked) for a model that reads no pixels (prompt_mode `text`, no late
    fusion): every note would embed the same blank prompt and every rank would tie at 0."""
    from core.data.pipeline import needs_image

    if modality == "image" and not needs_image(model_cfg):
        raise ValueError("modality 'image' needs a model that reads images; this one has prompt_mode=text and "
                         "late_fusion off (only 'text' and 'both' apply)")


def validation_recall(model, data_dir: str, run_cfg, device, max_queries: int | None = None, *,
                      modality: str = "both", pool: str = "test", preprocessor=None,
                      return_per_query: bool = False):
    """Recall@K on the held-out pairs, in-process (the training loop's validation).

    Reads pairs_test.parquet and notes.parquet from `data_dir`, preprocesses the needed notes with
    the data pipeline's `NotePreprocessor` (no Ray), embeds them with the multimodal embedding
    under `torch.no_grad` and scores them under the official protocol. Every rank of a ZeRO-3 run
    may call it: the batches are identical on each, so collective forwards line up.

    Args:
        model: the NoteLLM-2 module (on `device`).
        data_dir: prepared data directory.
        run_cfg: `RunConfig` (model prompt settings, eval.ks / batch_size / chunk_size).
        device: forward device.
        max_queries: evaluate only the first N test pairs (see `build_protocol`).
        modality: `both`, `image` or `text` (ablation).
        pool: `test` (official) or `all`.
        preprocessor: reuse a `NotePreprocessor` (it holds a tokenizer); built from run_cfg otherwise.
        return_per_query: also return the per-query DataFrame.

    Returns:
        The metrics dict of `evaluate_embeddings` (and the per-query frame if asked).
    """
    from core.data.pipeline import IMAGE_COLUMNS, TEXT_COLUMNS, NotePreprocessor, needs_image

    check_modality(run_cfg.model, modality)
    pairs = read_test_pairs(data_dir)
    all_ids = read_notes(data_dir, columns=["note_id"])["note_id"].to_numpy() if pool == "all" else None
    protocol = build_protocol(pairs, pool=pool, all_note_ids=all_ids, max_queries=max_queries)
    prep = preprocessor if preprocessor is not None else NotePreprocessor(run_cfg.model)
    columns = list(TEXT_COLUMNS) + (list(IMAGE_COLUMNS) if needs_image(run_cfg.model) else [])
    raw = read_notes(data_dir, protocol.needed_ids(), columns=columns)
    notes = preprocess_notes_local(raw, prep)
    blank = blank_text_prompt(prep.tokenizer, run_cfg.model) if modality == "image" else None
    ids, emb = embed_notes_local(model, notes, device, run_cfg.eval.batch_size, modality=modality,
                                 blank_ids=blank, pad_id=_pad_id(prep.tokenizer))
    metrics, per_query = evaluate_embeddings(ids, emb, protocol, run_cfg.eval.ks, run_cfg.eval.chunk_size)
    return (metrics, per_query) if return_per_query else metrics


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0))


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def k_label(k: int) -> str:
    """100 -> "100", 1000 -> "1k", 10000 -> "10k", 1000000 -> "1M" (the paper's column names)."""
    if k >= 1_000_000 and k % 1_000_000 == 0:
        return f"{k // 1_000_000}M"
    if k >= 1000 and k % 1000 == 0:
        return f"{k // 1000}k"
    return str(k)


def markdown_table(rows: Mapping[str, Mapping] | Sequence[tuple[str, Mapping]], ks: Iterable[int] | None = None,
                   subsets: Sequence[str] = SUBSETS, percent: bool = True) -> str:
    """Rows = models / modalities, columns = R@K per subset, in percent (the paper's table shape).

    Args:
        rows: {row name: metrics dict} or [(row name, metrics dict)], metrics as returned by
            `evaluate_embeddings`; not-applicable values print as "n/a".
        ks: cut-offs to show (default: those in the first row's "all").
        subsets: which subsets get columns.
        percent: print recall x 100 (as the paper does).
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    if not items:
        return ""
    if ks is None:
        ks = [int(key.split("@")[1]) for key in items[0][1].get("all", {})]
    ks = list(ks)
    header = ["model"] + [f"{s} R@{k_label(k)}" for s in subsets for k in ks] + ["queries", "pool"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in items:
        cells = [str(name)]
        for s in subsets:
            for k in ks:
                cells.append(format_recall((m.get(s) or {}).get(f"R@{k}"), percent=percent))
        cells += [str(m.get("num_queries", "")), str(m.get("pool_size", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
