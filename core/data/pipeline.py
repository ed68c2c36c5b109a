"""Streaming notes and pairs into training and evaluation with Ray Data (plus a local twin).

    ds = pair_dataset("runs/data/synthetic", "train", run_cfg)      # TorchTrainer(datasets={"train": ds})
    # in train_fn_per_worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B, drop_last=True): ...
    notes = note_dataset("runs/data/synthetic", run_cfg, note_ids=[...])   # evaluation
    for batch in iter_pair_batches_local(data_dir, "train", run_cfg, batch_size=8, seed=0): ...  # no Ray

Pair rows carry the layout of `core.step`: `{q,t}_input_ids` / `{q,t}_attention_mask` int64 [T]
(T = `core.prompts.prompt_length_bound`, fixed so Ray Data blocks stack), `{q,t}_pixel_values`
uint8 [3,S,S] (S = model.image_size; the columns are absent when the model uses no image:
prompt_mode `text` and late_fusion off), `{q,t}_has_image` bool, `{q,t}_note_id` int64.
With `data.hard_negatives` = K, train pairs also carry their first K mined negatives
(`negative_ids`, written by `rayjobs.mine_negatives`) as `n_`-prefixed columns with a slot axis
[K, ...] plus `n_valid` (layout: `core.step`); this needs the broadcast join.
A missing or undecodable image becomes zeros with has_image False; the preprocessing actor
logs how many and why.

How notes meet pairs (`data.pair_join`): with `broadcast` (the default up to 1 GiB of
notes.parquet) each preprocessing actor loads the notes table once and looks both notes of
a pair up by id (`PairPreprocessor`): no shuffle, so the first batch arrives in seconds, at
the price of the notes table (compressed bytes or URIs) in every actor's memory. Pairs stream
in file order (prepare_data writes train pairs in a seeded random order).

With `shuffle` (memory behaviour for large corpora): pairs are hash-joined with the *raw* notes twice
(`Dataset.join` on query_id, then on target_id) and the joined rows are decoded, resized and
tokenised by an actor pool (`map_batches(..., compute=ActorPoolStrategy(size=data.preprocess_actors))`,
one tokenizer per actor). The join moves compressed image bytes, not decoded pixels, and the
decoded tensors only exist in the streaming tail, bounded by Ray Data's backpressure. The cost:
a note that appears in k pairs is decoded k times (k <= 2 * top_t on average), and each join
partition holds its share of notes + pairs in an aggregator actor (spilled to disk by the object
store when it does not fit). Join output order is not the file order; it is already mixed.
`Dataset.join` needs `polars` installed. `note_dataset` preprocesses each note once.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Iterator

import numpy as np

from core.data.negatives import NEGATIVES_COLUMN, negative_slots
from core.data.schema import NOTES_FILE, PAIRS_FILES, data_path
from core.paths import is_remote

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("note_id", "title", "topics", "content")
IMAGE_COLUMNS = ("image", "image_uri")
PAIRS_PER_PARTITION = 250_000


def needs_image(model_cfg) -> bool:
    """Whether the model reads pixels: image tokens in the prompt, or late fusion."""
    return model_cfg.prompt_mode != "text" or bool(model_cfg.late_fusion)


class NotePreprocessor:
    """Raw note columns -> token ids, masks, pixels; one per Ray Data actor (holds a tokenizer).

    Args:
        model_cfg: a `ModelConfig` or its dict (the Ray boundary passes dicts).
        sides: column prefixes to process, each with its id column: `[("", "note_id")]` for
            notes, `[("q_", "query_id"), ("t_", "target_id")]` for joined pairs.
        decode_images: False leaves images out (no pixel_values / has_image columns): the run
            reads the frozen encoder's features from `core.data.features` instead.
    """

    def __init__(self, model_cfg, sides=(("", "note_id"),), decode_images: bool = True):
        from core.config import ModelConfig
        from core.model.builders import build_tokenizer
        from core.prompts import prompt_length_bound

        self.cfg = ModelConfig(**model_cfg) if isinstance(model_cfg, dict) else model_cfg
        self.tokenizer = build_tokenizer(self.cfg)
        self.max_length = prompt_length_bound(self.tokenizer, self.cfg)
        self.sides = [tuple(s) for s in sides]
        self.with_image = needs_image(self.cfg) and decode_images
        self.image_failures: Counter = Counter()

    def __call__(self, batch) -> dict:
        """A pyarrow Table (or dict of columns) -> dict of NumPy arrays in the pipeline layout."""
        from core.data.images import load_pixels
        from core.prompts import tokenize_notes

        cols = _columns(batch)
        out: dict[str, np.ndarray] = {}
        for prefix, id_col in self.sides:
            n = len(cols[id_col])
            notes = [{"title": cols[prefix + "title"][i], "topics": cols[prefix + "topics"][i], "content": cols[prefix + "content"][i]}
                     for i in range(n)]
            tok = tokenize_notes(self.tokenizer, notes, self.cfg, max_length=self.max_length)
            out[prefix + "note_id"] = np.asarray(cols[id_col], dtype=np.int64)
            out[prefix + "input_ids"] = tok["input_ids"]
            out[prefix + "attention_mask"] = tok["attention_mask"]
            if not prefix:
                out["text_chars"] = tok["text_chars"]
            if self.with_image:
                size = self.cfg.image_size
                pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
                has = np.zeros(n, dtype=bool)
                images, uris = cols.get(prefix + "image", [None] * n), cols.get(prefix + "image_uri", [None] * n)
                for i in range(n):
                    pixels[i], has[i], reason = load_pixels(images[i], uris[i], size)
                    if reason is not None:
                        self._count_failure(reason)
                out[prefix + "pixel_values"] = pixels  # uint8 [N, 3, S, S]
                out[prefix + "has_image"] = has
        return out

    def _count_failure(self, reason: str) -> None:
        self.image_failures[reason] += 1
        total = sum(self.image_failures.values())
        if reason != "missing" and (self.image_failures[reason] == 1 or total % 1000 == 0):
            log.warning("note images without pixels so far (blank + has_image False): %s", dict(self.image_failures))


def _columns(batch) -> dict:
    """Column name -> Python list, from a pyarrow Table or a dict of arrays."""
    if hasattr(batch, "column_names"):
        return {name: batch.column(name).to_pylist() for name in batch.column_names}
    return {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in batch.items()}


def _note_columns(model_cfg, decode_images: bool = True) -> list[str]:
    return list(TEXT_COLUMNS) + (list(IMAGE_COLUMNS) if needs_image(model_cfg) and decode_images else [])


def _actor_pool(run_cfg):
    import ray.data

    return ray.data.ActorPoolStrategy(size=int(run_cfg.data.preprocess_actors))


def _progress_bars_only_on_a_terminal() -> None:
    """Ray Data redraws its progress bars many times a second; written to a log file or a Ray
    job's output that is tens of thousands of lines per run. Keep them for a terminal only
    (`NOTELLM2_PROGRESS_BARS=1` forces them on). Datasets carry the context they were made in.

    Parquet stays on Ray 2.60's default (V2) reader. Its V1 reader gave the first pair batch
    ~1 s sooner, but it cuts a file into many small blocks, and `streaming_split` then handed
    them to the workers in arrival order: on a two-node cluster the same seed gave another step-1
    loss (tests/reliability/test_preemption.py). The V2 reader's 32 footer actors per read are
    cut to one for the embedded Ray by cluster/local_env.yaml."""
    import sys

    from ray.data import DataContext

    if os.environ.get("NOTELLM2_PROGRESS_BARS") != "1" and not sys.stdout.isatty():
        DataContext.get_current().enable_progress_bars = False


def note_dataset(data_dir, run_cfg, note_ids=None, batch_size: int = 64, decode_images: bool = True):
    """Preprocessed notes as a Ray Dataset (evaluation embeds these).

    Args:
        data_dir: prepared data directory (local path or URI).
        run_cfg: `RunConfig` (model settings decide prompts, image size, pixel columns).
        note_ids: keep only these notes (None: all).
        batch_size: notes per preprocessing call.
        decode_images: False reads no images (the consumer attaches cached features).

    Returns:
        Dataset with columns note_id, input_ids, attention_mask, text_chars and, when the model
        uses images and `decode_images`, pixel_values and has_image.
    """
    import ray.data

    _progress_bars_only_on_a_terminal()
    ds = ray.data.read_parquet(data_path(data_dir, NOTES_FILE), columns=_note_columns(run_cfg.model, decode_images))
    if note_ids is not None:
        keep = np.unique(np.asarray(list(note_ids), dtype=np.int64))

        def select(table):
            import pyarrow as pa
            import pyarrow.compute as pc

            return table.filter(pc.is_in(table["note_id"], value_set=pa.array(keep)))

        ds = ds.map_batches(select, batch_format="pyarrow")
    return ds.map_batches(
        NotePreprocessor, fn_constructor_kwargs={"model_cfg": _model_dict(run_cfg), "sides": [("", "note_id")],
                                                 "decode_images": decode_images},
        compute=_actor_pool(run_cfg), batch_size=batch_size, batch_format="pyarrow",
    )


def pair_dataset(data_dir, split: str, run_cfg, batch_size: int = 64, max_pairs: int | None = None,
                 decode_images: bool = True):
    """Pairs of `split` joined with both notes and preprocessed (layout: module docstring).

    Args:
        data_dir: prepared data directory (local path or URI).
        split: `train` or `test`.
        run_cfg: `RunConfig`.
        batch_size: pairs per preprocessing call.
        max_pairs: keep only the first N pairs, before any preprocessing. A run capped by
            `train.max_steps` below one epoch needs no more, and Ray Data's streaming executor
            would otherwise decode every image of the file ahead of the trainer, on the same CPUs.
        decode_images: False: no pixel columns (the trainer reads the frozen-feature cache).
    """
    import ray.data

    if split not in PAIRS_FILES:
        raise ValueError(f"split {split!r}: allowed {', '.join(PAIRS_FILES)}")
    pairs_path = data_path(data_dir, PAIRS_FILES[split])
    cols = _note_columns(run_cfg.model, decode_images)
    _progress_bars_only_on_a_terminal()
    negatives = int(run_cfg.data.hard_negatives) if split == "train" else 0
    pairs = ray.data.read_parquet(pairs_path, columns=["query_id", "target_id"] + ([NEGATIVES_COLUMN] if negatives else []))
    if max_pairs is not None:
        pairs = pairs.limit(int(max_pairs))
    notes_path = data_path(data_dir, NOTES_FILE)
    mode = pair_join_mode(notes_path, run_cfg.data.pair_join)
    if negatives and mode == "shuffle":
        log.warning("%s: data.hard_negatives looks negatives up by id, so every preprocessing actor loads the whole "
                    "notes table (broadcast join) although pair_join=auto would shuffle a file this large", notes_path)
    if negatives or mode == "broadcast":
        return pairs.map_batches(
            PairPreprocessor, fn_constructor_kwargs={"model_cfg": _model_dict(run_cfg), "notes_path": notes_path, "columns": cols,
                                                     "decode_images": decode_images, "negatives": negatives},
            compute=_actor_pool(run_cfg), batch_size=batch_size, batch_format="pyarrow",
        )
    notes = ray.data.read_parquet(notes_path, columns=cols)
    partitions = _num_partitions(pairs_path)
    joined = pairs
    for prefix, key in (("q_", "query_id"), ("t_", "target_id")):
        side = notes.rename_columns({c: prefix + c for c in cols})
        joined = joined.join(side, join_type="inner", num_partitions=partitions, on=(key,), right_on=(prefix + "note_id",))
    return joined.map_batches(
        NotePreprocessor, fn_constructor_kwargs={"model_cfg": _model_dict(run_cfg), "sides": [("q_", "query_id"), ("t_", "target_id")],
                                                 "decode_images": decode_images},
        compute=_actor_pool(run_cfg), batch_size=batch_size, batch_format="pyarrow",
    )


BROADCAST_MAX_BYTES = 1 << 30


def pair_join_mode(notes_path: str, mode: str) -> str:
    """`broadcast` or `shuffle` for `data.pair_join` (`auto`: broadcast up to 1 GiB of notes.parquet)."""
    if mode != "auto":
        return mode
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(notes_path) if is_remote(notes_path) else (pyarrow.fs.LocalFileSystem(), notes_path)
        size = fs.get_file_info(path).size
    except Exception:  # an unusual filesystem: the join scales to anything
        return "shuffle"
    return "broadcast" if size is not None and size <= BROADCAST_MAX_BYTES else "shuffle"


class PairPreprocessor:
    """Broadcast join + preprocessing in one actor: loads notes.parquet once, sorted by id, and
    turns each batch of (query_id, target_id) rows into the pair layout by looking both notes
    up. Pairs whose notes are missing are dropped, counted and logged (a hash join drops them
    silently). Holds the notes table (compressed image bytes or URIs) in actor memory.
    `negatives` = K adds each pair's first K `negative_ids` as the `n_` columns (`core.step`)."""

    def __init__(self, model_cfg, notes_path: str, columns: list[str], decode_images: bool = True, negatives: int = 0):
        import pyarrow.parquet as pq

        self.prep = NotePreprocessor(model_cfg, decode_images=decode_images)
        notes = pq.read_table(notes_path, columns=columns)
        ids = notes["note_id"].to_numpy()
        order = np.argsort(ids, kind="stable")
        self.ids, self.notes = ids[order], notes.take(order)
        self.notes_path = notes_path
        self.missing = 0
        self.negatives = int(negatives)
        self.missing_negatives = 0

    def __call__(self, batch) -> dict:
        cols = _columns(batch)
        q = np.asarray(cols["query_id"], dtype=np.int64)
        t = np.asarray(cols["target_id"], dtype=np.int64)
        qi, ti = self._rows(q), self._rows(t)
        keep = (qi >= 0) & (ti >= 0)
        if not keep.all():
            self.missing += int((~keep).sum())
            log.warning("%s: %d pair(s) so far reference note ids not in the file; dropped",
                        self.notes_path, self.missing)
        out: dict[str, np.ndarray] = {}
        for prefix, rows in (("q_", qi[keep]), ("t_", ti[keep])):
            for key, value in self.prep(self.notes.take(rows)).items():
                if key != "text_chars":
                    out[prefix + key] = value
        if self.negatives:
            lists = [cols[NEGATIVES_COLUMN][i] for i in np.flatnonzero(keep)]
            ids, valid = negative_slots(lists, q[keep], self.negatives)  # [n, K] each
            rows = self._rows(ids.reshape(-1))  # [n*K]
            absent = (rows < 0) & valid.reshape(-1)
            if absent.any():
                self.missing_negatives += int(absent.sum())
                log.warning("%s: %d mined negative(s) so far are not in the file; their slots stay empty",
                            self.notes_path, self.missing_negatives)
            valid &= rows.reshape(valid.shape) >= 0
            rows = np.where(rows >= 0, rows, np.repeat(qi[keep], self.negatives))  # empty slot: the query note
            out.update(negative_columns(self.prep(self.notes.take(rows)), valid))
        return out

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the sorted notes table, -1 where absent."""
        if len(self.ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)


def negative_columns(prepared: dict, valid: np.ndarray) -> dict:
    """The `n_` columns of a pair batch from the preprocessed negatives [n*K] and the slot mask [n, K]."""
    n, k = valid.shape
    out = {"n_" + key: value.reshape(n, k, *value.shape[1:]) for key, value in prepared.items() if key != "text_chars"}
    out["n_valid"] = valid
    return out


def _num_partitions(pairs_path: str) -> int:
    """Join partitions from the pair count in the Parquet footer (no data read)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(pairs_path).metadata.num_rows if not is_remote(pairs_path) else pq.read_metadata(pairs_path).num_rows
    except Exception:  # a directory of files or an unusual filesystem: fall back to a small default
        rows = PAIRS_PER_PARTITION
    return int(min(200, max(1, math.ceil(rows / PAIRS_PER_PARTITION))))


def _model_dict(run_cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(run_cfg.model)


def iter_pair_batches_local(data_dir, split: str, run_cfg, batch_size: int, seed: int = 0, drop_last: bool = True,
                            decode_images: bool = True) -> Iterator[dict]:
    """The pair batches of `pair_dataset`, without Ray: for plain-loop baselines and unit tests.

    Every note referenced by the split is preprocessed once and held in memory, so this suits
    corpora that fit one machine. Pairs are shuffled by `seed`. `decode_images` as in `pair_dataset`.

    Yields:
        dict of torch tensors in the `core.step` layout.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    negatives = int(run_cfg.data.hard_negatives) if split == "train" else 0
    pairs = pq.read_table(data_path(data_dir, PAIRS_FILES[split]),
                          columns=["query_id", "target_id"] + ([NEGATIVES_COLUMN] if negatives else []))
    q, t = pairs["query_id"].to_numpy(), pairs["target_id"].to_numpy()
    needed = np.unique(np.concatenate([q, t]))
    notes = pq.read_table(data_path(data_dir, NOTES_FILE), columns=_note_columns(run_cfg.model, decode_images))
    if negatives:
        neg_ids, neg_valid = negative_slots(pairs[NEGATIVES_COLUMN].to_pylist(), q, negatives)  # [P, K]
        known = np.isin(neg_ids, notes["note_id"].to_numpy())
        if (neg_valid & ~known).any():
            log.warning("%s: %d mined negative(s) are not in %s; their slots stay empty", data_dir,
                        int((neg_valid & ~known).sum()), NOTES_FILE)
        neg_valid &= known
        neg_ids = np.where(neg_valid, neg_ids, q[:, None])  # empty slot: the query note
        needed = np.union1d(needed, neg_ids.reshape(-1))
    notes = notes.filter(pc.is_in(notes["note_id"], value_set=pa.array(needed)))
    order = np.argsort(notes["note_id"].to_numpy(), kind="stable")
    notes = notes.take(order)
    ids = notes["note_id"].to_numpy()
    missing = np.setdiff1d(needed, ids)
    if len(missing):
        raise KeyError(f"{data_dir}: {len(missing)} pair note ids are not in {NOTES_FILE}, e.g. {missing[:5].tolist()}")
    prep = NotePreprocessor(run_cfg.model, decode_images=decode_images)
    feats = [prep(notes.slice(i, 256)) for i in range(0, notes.num_rows, 256)]
    table = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
    qi, ti = np.searchsorted(ids, q), np.searchsorted(ids, t)
    perm = np.random.default_rng(seed).permutation(len(q))
    stop = len(perm) - (len(perm) % batch_size if drop_last else 0)
    keys = [k for k in ("input_ids", "attention_mask", "pixel_values", "has_image", "note_id") if k in table]
    for start in range(0, stop, batch_size):
        rows = perm[start:start + batch_size]
        batch = {}
        for prefix, idx in (("q_", qi[rows]), ("t_", ti[rows])):
            for k in keys:
                batch[prefix + k] = torch.from_numpy(np.ascontiguousarray(table[k][idx]))
        if negatives:
            idx = np.searchsorted(ids, neg_ids[rows].reshape(-1))  # [b*K]
            cols = negative_columns({k: table[k][idx] for k in keys}, neg_valid[rows])
            batch.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cols.items()})
        yield batch
