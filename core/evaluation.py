"""The I2I evaluation protocol (REFERENCE §7): pools, subsets, Recall@K with ties and intervals.

Queries are the held-out pairs' query notes (pairs_val.parquet while training and choosing,
pairs_test.parquet once, for the final numbers), targets their target notes. Each subset (all
pairs, short query, short target; `short_*` flags, threshold `data.short_text_chars`) is
deduplicated greedily on its own (each note once) and gets its own candidate pool:

- `catalog` (default): every note of the corpus minus that subset's queries (what production ranks);
- `official`: the held-out split's notes (its queries and all their targets) minus that subset's queries;
- `targets`: the targets of the deduplicated pairs — a *reduced* pool, labelled as such.

Each query ranks its pool by the dot product of L2-normalised embeddings; ties follow
`core.metrics` (`expected` by default). Every recall carries a 95 % bootstrap interval over queries.

    protocol = build_protocol(pairs_df, pool="catalog", all_note_ids=ids)
    metrics, per_query = evaluate_embeddings(ids, emb, protocol, ks=[10, 100])
    # {"all": {"R@10": 0.31, ..}, "short_query": {..}, "short_target": {..},
    #  "ci95": {"all": {"R@10": [0.27, 0.35]}, ..}, "pool": "catalog", "pool_size": 700,
    #  "pool_sizes": {"all": 700, ..}, "ties": "expected", "tied_fraction": 0.0, "num_queries": 120, ..}
    diff = paired_difference(per_query_a, per_query_b, ks=[10])   # {"all": {"R@10": {"mean", "ci95"}}}

The training loop calls `validation_recall(model, data_dir, run_cfg, device)` (split `val`),
which preprocesses and embeds in-process (no Ray); `rayjobs.evaluate` embeds with Ray Data
actors. Both go through `embed_batch`, so the two paths give the same embeddings.

The embeddings and the modality ablation live in `core.embedding`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from core.config import EVAL_POOLS as POOLS
from core.data.split import dedupe_test_pairs
from core.distributed import gather_embeddings, world_info
from core.embedding import blank_text_prompt, embed_notes_local, prefix_embeddings
from core.metrics import (
    SUBSETS,
    approximate_target_ranks,
    flatten_recall,
    format_recall_ci,
    paired_recall_ci,
    query_hits,
    recall_ci,
    recall_report,
    target_rank_counts,
)

log = logging.getLogger(__name__)

TIED_WARN_FRACTION = 0.01
"""Evaluation warns when more than this fraction of targets tie with some candidate."""


# ---------------------------------------------------------------------------------------------
# Protocol: which notes are queries, targets and candidates
# ---------------------------------------------------------------------------------------------


@dataclass
class SubsetProtocol:
    """One subset's deduplicated queries and targets (aligned [Q]) and its candidate pool [P]."""

    query_ids: np.ndarray
    target_ids: np.ndarray
    pool_ids: np.ndarray

    @property
    def num_queries(self) -> int:
        return int(len(self.query_ids))


@dataclass
class Protocol:
    """Per-subset queries, targets and pools under one pool policy (`POOLS`)."""

    pool: str
    subsets: dict[str, SubsetProtocol] = field(default_factory=dict)
    dropped_pairs: int = 0
    """Pairs removed because their target was itself a query of the subset (none after dedupe)."""

    @property
    def num_queries(self) -> int:
        return self.subsets["all"].num_queries

    @property
    def query_ids(self) -> np.ndarray:
        return self.subsets["all"].query_ids

    @property
    def target_ids(self) -> np.ndarray:
        return self.subsets["all"].target_ids

    @property
    def pool_ids(self) -> np.ndarray:
        return self.subsets["all"].pool_ids

    def needed_ids(self) -> np.ndarray:
        """Every note that must be embedded: every subset's queries and pool, sorted, unique."""
        parts = [np.union1d(p.query_ids, p.pool_ids) for p in self.subsets.values()]
        return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Greedy one-note-once dedupe of held-out pairs (`core.data.split.dedupe_test_pairs`), in pandas."""
    if df.empty:
        return df
    table = pa.table({"query_id": df["query_id"].to_numpy(np.int64), "target_id": df["target_id"].to_numpy(np.int64),
                      "score": df["score"].to_numpy(np.float64) if "score" in df else np.zeros(len(df))})
    kept = dedupe_test_pairs(table)
    keys = pd.DataFrame({"query_id": kept["query_id"].to_numpy(), "target_id": kept["target_id"].to_numpy()})
    return keys.merge(df.drop_duplicates(["query_id", "target_id"]), on=["query_id", "target_id"], how="left")


def build_protocol(pairs, pool: str = "catalog", all_note_ids: Iterable[int] | None = None,
                   max_queries: int | None = None) -> Protocol:
    """Per-subset queries, targets and candidate pools from held-out pairs.

    Args:
        pairs: a pandas DataFrame (or anything `pd.DataFrame` accepts) with query_id, target_id
            and optionally score, short_query, short_target: the held-out split's pairs,
            deduplicated or not (each subset is deduplicated here on its own).
        pool: `catalog` (all notes minus the subset's queries; needs `all_note_ids`), `official`
            (the split's notes minus the subset's queries) or `targets` (reduced: the
            deduplicated targets, one pool shared by the subsets).
        all_note_ids: note ids of the whole corpus; required for pool=`catalog`.
        max_queries: keep only each subset's first N deduplicated pairs (by query id) for a cheap
            signal; values are comparable only at equal N.

    Returns:
        A `Protocol`.
    """
    df = pd.DataFrame(pairs)
    missing = {"query_id", "target_id"} - set(df.columns)
    if missing:
        raise ValueError(f"held-out pairs lack columns {sorted(missing)}; have {list(df.columns)}")
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: allowed {', '.join(POOLS)}")
    for flag in ("short_query", "short_target"):
        df[flag] = df[flag].astype(bool) if flag in df.columns else False
    split_notes = np.union1d(df["query_id"].to_numpy(np.int64), df["target_id"].to_numpy(np.int64))
    if pool == "catalog":
        if all_note_ids is None:
            raise ValueError("pool='catalog' needs all_note_ids (every note id of the corpus)")
        base = np.unique(np.asarray(list(all_note_ids), dtype=np.int64))
    else:
        base = split_notes
    deduped_all = _dedupe(df)
    protocol = Protocol(pool)
    for subset in SUBSETS:
        if pool == "targets":  # one shared reduced pool: masks over the all-pairs dedupe
            sub = deduped_all if subset == "all" else deduped_all[deduped_all[subset]]
        else:
            sub = deduped_all if subset == "all" else _dedupe(df[df[subset]])
        if max_queries is not None:
            sub = sub.iloc[: int(max_queries)]
        q, t = sub["query_id"].to_numpy(np.int64), sub["target_id"].to_numpy(np.int64)
        if pool == "targets":
            all_q = deduped_all["query_id"].to_numpy(np.int64)
            all_t = deduped_all["target_id"].to_numpy(np.int64)
            if max_queries is not None:
                all_q, all_t = all_q[: int(max_queries)], all_t[: int(max_queries)]
            pool_ids = np.setdiff1d(all_t, all_q)
        else:
            pool_ids = np.setdiff1d(base, q)
        keep = np.isin(t, pool_ids)
        dropped = int((~keep).sum())
        if subset == "all":
            protocol.dropped_pairs = dropped
        if dropped:
            log.warning("%s: %d held-out pairs dropped: their target is not in the %s pool", subset, dropped, pool)
        protocol.subsets[subset] = SubsetProtocol(q[keep], t[keep], pool_ids)
    return protocol


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
    ties: str = "expected",
    n_boot: int = 2000,
    **index_kwargs,
):
    """Recall@K (with 95 % intervals) per subset for embeddings of every needed note.

    Args:
        note_ids: int [N] ids of the embedding rows.
        embeddings: float [N, d].
        protocol: from `build_protocol`.
        ks: Recall@K cut-offs; K beyond the subset's pool is reported as None.
        chunk_size: candidates scored at a time (bounded memory, exact ranks).
        normalize: L2-normalise before the dot product (the protocol's similarity).
        index: `exact` (chunked exact ranks) or a FAISS index kind, `hnsw` / `ivf`, for pools in
            the millions; approximate ranks stop at max(ks) (a rank of max(ks) = not retrieved),
            and FAISS breaks score ties in its own arbitrary order (no tie counts).
        exact_check_queries: with a FAISS index, also rank this many queries (a seeded sample)
            exactly and report `approx_check` (0 skips the check).
        ties: tie policy of `core.metrics` (`expected`, `pessimistic`, `optimistic`).
        n_boot: bootstrap resamples of the intervals.
        **index_kwargs: FAISS settings (`ef_search`, `nprobe`, ...; see core.metrics).

    Returns:
        (metrics, per_query): metrics as in the module docstring; per_query a pandas DataFrame
        with subset, query_id, target_id, rank (candidates strictly above the target), tied
        (candidates tied with it), one row per query of each subset.
    """
    ks = sorted({int(k) for k in ks})
    ids = torch.as_tensor(np.asarray(note_ids)).long().numpy()
    emb = torch.as_tensor(embeddings).float()  # [N, d]
    if emb.dim() != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings {tuple(emb.shape)} do not match {len(ids)} note ids")
    if normalize:
        emb = F.normalize(emb, dim=-1)
    if len(emb) > 1 and float((emb - emb[:1]).abs().max()) < 1e-6:
        log.warning("all %d embeddings are identical: every candidate ties with the target, so recall is "
                    "chance level (K / pool under expected ties) and means nothing", len(emb))
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    metrics: dict = {"ci95": {}, "num": {}, "pool_sizes": {}}
    frames, approx_check = [], None
    for subset, sp in protocol.subsets.items():
        query_rows = _rows_of(sp.query_ids, sorted_ids, order, "query")
        pool_rows = _rows_of(sp.pool_ids, sorted_ids, order, "pool")
        # pool_ids is sorted, so a target's pool row is a binary search away
        target_index = torch.from_numpy(np.searchsorted(sp.pool_ids, sp.target_ids)).long()
        queries, pool = emb[torch.from_numpy(query_rows)], emb[torch.from_numpy(pool_rows)]  # [Q, d], [P, d]
        pool_size = int(len(sp.pool_ids))
        if index == "exact":
            above, tied = target_rank_counts(queries, pool, target_index, chunk_size=chunk_size)  # [Q], [Q]
        else:
            max_k = min(max(ks), pool_size)
            above = torch.from_numpy(approximate_target_ranks(queries, pool, target_index, max_k, index, **index_kwargs))
            tied = None
            if subset == "all":
                approx_check = _approx_check(queries, pool, target_index, above, ks, pool_size, chunk_size,
                                             exact_check_queries, ties)
        metrics[subset] = recall_report(above, ks, pool_size, tied, ties)
        metrics["ci95"][subset] = {
            f"R@{k}": (list(recall_ci(query_hits(above, tied, k, ties), n_boot=n_boot))
                       if metrics[subset][f"R@{k}"] is not None else None) for k in ks}
        metrics["num"][subset] = sp.num_queries
        metrics["pool_sizes"][subset] = pool_size
        frames.append(pd.DataFrame({"subset": subset, "query_id": sp.query_ids, "target_id": sp.target_ids,
                                    "rank": above.numpy(), "tied": tied.numpy() if tied is not None else 0}))
    per_query = pd.concat(frames, ignore_index=True)
    all_rows = per_query[per_query["subset"] == "all"]
    tied_fraction = float((all_rows["tied"] > 0).mean()) if len(all_rows) else 0.0
    if tied_fraction > TIED_WARN_FRACTION:
        log.warning("%.1f%% of targets tie with at least one candidate: recall is reported under %s ties",
                    100 * tied_fraction, ties)
    metrics.update(num_queries=protocol.num_queries, pool=protocol.pool, pool_size=metrics["pool_sizes"]["all"],
                   ties=ties if index == "exact" else "faiss-order", tied_fraction=tied_fraction)
    if protocol.dropped_pairs:
        metrics["dropped_pairs"] = protocol.dropped_pairs
    if approx_check is not None:
        metrics["approx_check"] = approx_check
    return metrics, per_query


def _approx_check(queries, pool, target_index, approx_ranks, ks, pool_size: int, chunk_size: int, n: int,
                  ties: str) -> dict | None:
    """Exact vs approximate Recall@K on a seeded sample of the queries (what the index costs)."""
    if n <= 0 or not len(queries):
        return None
    sample = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(queries))[:n]))
    above, tied = target_rank_counts(queries[sample], pool, target_index[sample], chunk_size=chunk_size)
    exact_r = recall_report(above, ks, pool_size, tied, ties)
    approx_r = recall_report(approx_ranks[sample], ks, pool_size)
    loss = {k: (exact_r[k] - approx_r[k]) if exact_r[k] is not None and approx_r[k] is not None else None for k in exact_r}
    return {"queries": int(len(sample)), "exact": exact_r, "approximate": approx_r, "recall_loss": loss}


def paired_difference(per_query_a: pd.DataFrame, per_query_b: pd.DataFrame, ks: Iterable[int],
                      ties: str = "expected", n_boot: int = 2000) -> dict:
    """Recall of model a minus model b on the same queries, with a paired 95 % bootstrap interval.

    Args:
        per_query_a, per_query_b: `evaluate_embeddings` per-query frames of the same protocol.
        ks: cut-offs.

    Returns:
        {subset: {"R@K": {"mean": a - b, "ci95": [lo, hi]}}}.
    """
    out: dict = {}
    for subset in SUBSETS:
        a = per_query_a[per_query_a["subset"] == subset]
        b = per_query_b[per_query_b["subset"] == subset]
        joined = a.merge(b, on=["query_id", "target_id"], suffixes=("_a", "_b"))
        if len(joined) != len(a) or len(joined) != len(b):
            raise ValueError(f"{subset}: the two evaluations do not share their queries ({len(a)} vs {len(b)}, "
                             f"{len(joined)} in common); compare runs evaluated under the same protocol")
        if not len(joined):
            continue
        out[subset] = {}
        for k in ks:
            ha = query_hits(joined["rank_a"].to_numpy(), joined["tied_a"].to_numpy(), int(k), ties)
            hb = query_hits(joined["rank_b"].to_numpy(), joined["tied_b"].to_numpy(), int(k), ties)
            out[subset][f"R@{k}"] = {"mean": float((ha - hb).mean()),
                                     "ci95": list(paired_recall_ci(ha, hb, n_boot=n_boot))}
    return out


def evaluate_dims(note_ids, embeddings, protocol: Protocol, ks: Iterable[int], dims: Iterable[int], **kwargs) -> dict:
    """{d: metrics of `evaluate_embeddings` on `prefix_embeddings(embeddings, d)`} for each dim:
    every trained Matryoshka width from one embedding pass (the caller stores it under "dims")."""
    emb = torch.as_tensor(embeddings).float()
    return {int(d): evaluate_embeddings(note_ids, prefix_embeddings(emb, d), protocol, ks, **kwargs)[0] for d in dims}


def flatten_metrics(metrics: Mapping) -> dict[str, float]:
    """{"R@100": 0.75, "short_query/R@100": ...}: the flat names runs report (`core.metrics.flatten_recall`)."""
    return flatten_recall(metrics)


# ---------------------------------------------------------------------------------------------
# In-process data loading (no Ray) for validation
# ---------------------------------------------------------------------------------------------


def read_pairs(data_dir: str, split: str):
    """pairs_<split>.parquet (`val` or `test`) as a pandas DataFrame (local path, NFS, s3:// or gs://).

    Raises:
        FileNotFoundError: one line saying to re-run prepare_data when the split is missing
            (data prepared before the validation split existed has no pairs_val.parquet).
    """
    from core.data.schema import HELD_OUT_SPLITS, PAIRS_FILES, data_path, read_table

    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"split {split!r}: allowed {', '.join(HELD_OUT_SPLITS)}")
    path = data_path(data_dir, PAIRS_FILES[split])
    try:
        return read_table(path).to_pandas()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; re-run python -m rayjobs.prepare_data for this corpus "
                                f"(it writes pairs_val.parquet and pairs_test.parquet)") from None


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
                      modality: str = "both", split: str = "val", pool: str | None = None, preprocessor=None,
                      return_per_query: bool = False, kind: str = "multimodal", dims=None, dim: int | None = None,
                      features="auto", rank: int = 0, world: int = 1):
    """Recall@K on held-out pairs, in-process (the training loop's validation; the demo's final tables).

    Reads pairs_<split>.parquet and notes.parquet from `data_dir`, preprocesses the needed notes
    with the data pipeline's `NotePreprocessor` (no Ray), embeds them with the multimodal
    embedding under `torch.no_grad` and scores them under the protocol. In a multi-worker run
    every rank calls it with its `rank`/`world`: each embeds an equal share (ZeRO-3's collective
    forwards line up), the embeddings are all-gathered, and every rank scores the same metrics.

    Args:
        model: the NoteLLM-2 module (on `device`).
        data_dir: prepared data directory.
        run_cfg: `RunConfig` (model prompt settings, eval.ks / pool / ties / batch_size / chunk_size).
        device: forward device.
        max_queries: evaluate only each subset's first N pairs (see `build_protocol`).
        modality: `both`, `image` or `text` (ablation).
        split: `val` (everything that chooses) or `test` (final numbers of chosen models only).
        pool: `catalog`, `official` or `targets`; default `run_cfg.eval.pool`.
        preprocessor: reuse a `NotePreprocessor` (it holds a tokenizer); built from run_cfg otherwise.
        return_per_query: also return the per-query DataFrame.
        kind: `multimodal` (the note embedding), `visual` (mICL slot) or `image-features`
            (the raw frozen vision feature: the no-training baseline).
        dims: Matryoshka widths also scored (`evaluate_dims`, under "dims"); default the trained
            ones, `run_cfg.loss.matryoshka_dims` (none for image-features).
        dim: score the embedding's first `dim` coordinates, re-normalised, as the embedding
            (`prefix_embeddings`; the per-query frame is then that width's).
        features: a `core.data.features.FeatureCache`, None (encode pixels), or `auto`: the
            cache of `model.vision` when `data.feature_cache` allows (`feature_cache_for`).
        rank, world: with world > 1 every rank of the default process group calls this; each
            preprocesses and embeds its contiguous share of the notes (padded to equal length,
            so ZeRO-3's collective forwards line up) and the embeddings are all-gathered.

    Returns:
        The metrics dict of `evaluate_embeddings` (and the per-query frame if asked).
    """
    from core.data.features import feature_cache_for
    from core.data.pipeline import IMAGE_COLUMNS, TEXT_COLUMNS, NotePreprocessor, needs_image

    if kind != "image-features":
        check_modality(run_cfg.model, modality)
    pool = pool or run_cfg.eval.pool
    pairs = read_pairs(data_dir, split)
    all_ids = read_notes(data_dir, columns=["note_id"])["note_id"].to_numpy() if pool == "catalog" else None
    protocol = build_protocol(pairs, pool=pool, all_note_ids=all_ids, max_queries=max_queries)
    if isinstance(features, str):
        features = feature_cache_for(getattr(model, "vision", model), run_cfg, data_dir)
    prep = preprocessor if preprocessor is not None else NotePreprocessor(run_cfg.model, decode_images=features is None)
    columns = list(TEXT_COLUMNS) + (list(IMAGE_COLUMNS) if needs_image(run_cfg.model) and features is None else [])
    if world > 1 and world_info() != (rank, world):
        raise ValueError(f"sharded validation as rank {rank} of {world} needs that process group; have {world_info()}")
    needed = protocol.needed_ids()
    share = -(-len(needed) // world)  # notes per rank
    mine = needed[rank * share:(rank + 1) * share] if world > 1 else needed
    notes = preprocess_notes_local(read_notes(data_dir, mine if len(mine) else needed[:1], columns=columns), prep)
    if world > 1:  # repeat the first row up to `share` rows: every rank runs the same batches
        notes = {k: np.concatenate([v, np.repeat(v[:1], share - len(v), axis=0)]) for k, v in notes.items()}
    blank = blank_text_prompt(prep.tokenizer, run_cfg.model) if modality == "image" else None
    ids, emb = embed_notes_local(model, notes, device, run_cfg.eval.batch_size, kind=kind, modality=modality,
                                 blank_ids=blank, pad_id=_pad_id(prep.tokenizer), features=features)
    if world > 1:
        ids, emb = gather_embeddings(ids)[0], gather_embeddings(emb)[0]  # [world * share], [world * share, d]
        ids, first = np.unique(ids.numpy(), return_index=True)  # drop the padding repeats
        ids, emb = torch.from_numpy(ids), emb[torch.from_numpy(first)]
    if dim is not None:
        emb = prefix_embeddings(emb, dim)
    metrics, per_query = evaluate_embeddings(ids, emb, protocol, run_cfg.eval.ks, run_cfg.eval.chunk_size,
                                             ties=run_cfg.eval.ties)
    dims = (run_cfg.loss.matryoshka_dims if kind != "image-features" else []) if dims is None else dims
    if dims:
        metrics["dims"] = evaluate_dims(ids, emb, protocol, run_cfg.eval.ks, dims, chunk_size=run_cfg.eval.chunk_size,
                                        ties=run_cfg.eval.ties)
    metrics["split"] = split
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
    # cells: "31.20 (27.1–35.4)" = recall and its 95 % bootstrap interval over queries, in percent
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in items:
        cells = [str(name)]
        for s in subsets:
            for k in ks:
                cells.append(format_recall_ci((m.get(s) or {}).get(f"R@{k}"),
                                              ((m.get("ci95") or {}).get(s) or {}).get(f"R@{k}"), percent=percent))
        pool = f"{m.get('pool_size', '')}" + (f" ({m['pool']})" if m.get("pool") else "")
        cells += [str(m.get("num_queries", "")), pool]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
