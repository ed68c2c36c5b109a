"""Hard negatives mined with a trained model (positive-aware, ANCE/NV-Retriever style filtering).

`mine_hard_negatives` takes the training pairs, the click log and finalised embeddings of the
training notes and gives every pair a list of negative note ids (`negative_ids`, list<int64>):

    for each query q, its `hi` nearest training notes by cosine (exact inner product up to
    EXACT_MAX_POOL notes, FAISS HNSW beyond), ranked 0.. without q itself; a candidate c at rank r
    is dropped, in this order and counted under that name, when it is
      query           q itself
      positive        paired with q in the training pairs (either direction)
      co_occurring    in one click-log event with q (viewed -> clicked, either direction)
      above_range     r < lo: too close to be safely negative
      margin          score(q, c) >= score(q, t) - relative_margin * |score(q, t)| for the pair's
                      target t ((1 - margin) x the positive for a positive score): a likely
                      unlabelled positive (positive-aware filtering)
    and the pair keeps a seeded random sample of at most K of the rest (ranks lo..hi-1).

`negative_slots` turns the lists into the fixed K slots a training batch carries (`core.step`):
a pair with fewer than K negatives has empty slots, masked in the loss. The command that runs
this on a prepared data directory is `python -m rayjobs.mine_negatives`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NEGATIVES_COLUMN = "negative_ids"
NEGATIVES_REPORT_FILE = "negatives_report.json"
EXACT_MAX_POOL = 50_000
RULES = ("query", "positive", "co_occurring", "above_range", "margin")


@dataclass
class MiningReport:
    """What mining saw and dropped; `removed` counts (pair, candidate) decisions by rule."""

    settings: dict
    pairs: int = 0
    queries: int = 0
    pool: int = 0
    search: str = "exact"
    candidates_seen: int = 0
    eligible: int = 0
    """Candidates no rule removed (before the sample of K): candidates_seen = eligible + removed, query aside."""
    removed: dict = field(default_factory=lambda: dict.fromkeys(RULES, 0))
    negatives_per_pair: dict = field(default_factory=dict)
    pairs_short_of_k: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_rank_range(text: str) -> tuple[int, int]:
    """`"10:100"` -> (10, 100): ranks 10..99 of a query's neighbours (0 = the nearest other note)."""
    try:
        lo, hi = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"rank range {text!r}: expected LO:HI, e.g. 10:100") from None
    if not 0 <= lo < hi:
        raise ValueError(f"rank range {text!r}: need 0 <= LO < HI")
    return lo, hi


def related_sets(pairs: pa.Table, events: pa.Table | None) -> tuple[dict, dict]:
    """(positives, co-occurring): note id -> set of note ids, each relation taken in both directions."""
    positives: dict[int, set] = defaultdict(set)
    for a, b in zip(pairs["query_id"].to_numpy(), pairs["target_id"].to_numpy()):
        positives[int(a)].add(int(b))
        positives[int(b)].add(int(a))
    co: dict[int, set] = defaultdict(set)
    if events is not None and events.num_rows:
        for a, b in zip(events["viewed_note_id"].to_numpy(), events["clicked_note_id"].to_numpy()):
            co[int(a)].add(int(b))
            co[int(b)].add(int(a))
    return positives, co


def nearest_neighbours(note_ids: np.ndarray, embeddings: np.ndarray, query_ids: np.ndarray, k: int):
    """Top-k (ids [Q, k'], scores [Q, k']) of each query among the notes, the query included;
    k' = min(k, N). Exact inner product up to EXACT_MAX_POOL notes, FAISS HNSW beyond."""
    from core.related_index import build_index

    rows = np.searchsorted(note_ids, query_ids)
    want = min(int(k), len(note_ids))
    if len(note_ids) <= EXACT_MAX_POOL:
        out_ids, out_scores = [], []
        for s in range(0, len(rows), 1024):  # [chunk, N] similarity blocks
            sims = embeddings[rows[s:s + 1024]] @ embeddings.T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :want]
            out_ids.append(note_ids[top])
            out_scores.append(np.take_along_axis(sims, top, axis=1))
        return np.concatenate(out_ids), np.concatenate(out_scores), "exact"
    index = build_index(embeddings, "hnsw")
    index.hnsw.efSearch = max(int(index.hnsw.efSearch), 2 * want)
    scores, found = index.search(np.ascontiguousarray(embeddings[rows]), want)  # [Q, want]; -1 = none
    return np.where(found >= 0, note_ids[np.maximum(found, 0)], -1), scores, "hnsw"


def mine_hard_negatives(pairs: pa.Table, events: pa.Table | None, note_ids: np.ndarray, embeddings: np.ndarray, *,
                        num_negatives: int = 8, rank_range: tuple[int, int] = (10, 100),
                        relative_margin: float = 0.05, seed: int = 0) -> tuple[pa.Table, MiningReport]:
    """Negatives for every training pair (rules: module docstring).

    Args:
        pairs: training pairs (query_id, target_id, ...); every id must be in `note_ids`.
        events: the click log (viewed_note_id, clicked_note_id), or None.
        note_ids: int64 [N] sorted ids of the candidate pool (the training notes).
        embeddings: float32 [N, d], L2-normalised rows (`core.related_index.finalize_embeddings`).
        num_negatives: K, negatives kept per pair (at most).
        rank_range: (lo, hi): candidate ranks lo..hi-1.
        relative_margin: drop candidates scoring >= pos - margin * |pos|, pos the pair's positive score.
        seed: seed of the sample of K among the eligible candidates.

    Returns:
        (pairs with a `negative_ids` list<int64> column, in the input's row order; the report).
    """
    lo, hi = rank_range
    if num_negatives < 1:
        raise ValueError(f"num_negatives={num_negatives}: must be >= 1")
    if not 0.0 <= relative_margin < 1.0:
        raise ValueError(f"relative_margin={relative_margin}: must be in [0, 1)")
    note_ids = np.asarray(note_ids, dtype=np.int64)
    q, t = pairs["query_id"].to_numpy().astype(np.int64), pairs["target_id"].to_numpy().astype(np.int64)
    missing = np.setdiff1d(np.concatenate([q, t]), note_ids)
    if len(missing):
        raise ValueError(f"{len(missing)} pair note ids have no embedding, e.g. {missing[:5].tolist()}")
    report = MiningReport(settings={"num_negatives": int(num_negatives), "rank_range": [int(lo), int(hi)],
                                    "relative_margin": float(relative_margin), "seed": int(seed)},
                          pairs=int(len(q)), pool=int(len(note_ids)))
    positives, co = related_sets(pairs, events)
    queries = np.unique(q)
    report.queries = int(len(queries))
    nn_ids, nn_scores, report.search = nearest_neighbours(note_ids, embeddings, queries, hi + 1)
    query_row = {int(x): i for i, x in enumerate(queries)}
    emb_row = np.searchsorted(note_ids, t)
    pos_scores = np.einsum("pd,pd->p", embeddings[np.searchsorted(note_ids, q)], embeddings[emb_row])  # [P]
    rng = np.random.default_rng(seed)
    negatives = []
    for p in range(len(q)):
        qid, i = int(q[p]), query_row[int(q[p])]
        threshold = pos_scores[p] - relative_margin * abs(pos_scores[p])  # = (1 - m) * pos when pos >= 0
        eligible, rank = [], 0
        for cid, score in zip(nn_ids[i], nn_scores[i]):
            cid = int(cid)
            if cid < 0:
                continue
            if cid == qid:
                report.removed["query"] += 1
                continue
            if rank >= hi:
                break
            report.candidates_seen += 1
            rank += 1
            rule = ("positive" if cid in positives[qid] else "co_occurring" if cid in co[qid]
                    else "above_range" if rank - 1 < lo else "margin" if score >= threshold else None)
            if rule is not None:
                report.removed[rule] += 1
            else:
                eligible.append(cid)
        report.eligible += len(eligible)
        if len(eligible) > num_negatives:
            eligible = [eligible[j] for j in sorted(rng.choice(len(eligible), num_negatives, replace=False))]
        negatives.append(eligible)
    counts = np.array([len(n) for n in negatives]) if negatives else np.zeros(1, dtype=int)
    report.negatives_per_pair = {"min": int(counts.min()), "median": float(np.median(counts)),
                                 "mean": round(float(counts.mean()), 3), "max": int(counts.max())}
    report.pairs_short_of_k = int((counts < num_negatives).sum())
    column = pa.array(negatives, type=pa.list_(pa.int64()))
    if NEGATIVES_COLUMN in pairs.column_names:
        pairs = pairs.drop_columns([NEGATIVES_COLUMN])
    return pairs.append_column(NEGATIVES_COLUMN, column), report


def negative_slots(lists, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's first K negatives as fixed slots: (ids int64 [P, K], valid bool [P, K]).

    An empty slot (a pair with fewer than K negatives) holds the pair's query id and valid False:
    a real note, so it preprocesses and has cached features, and the loss masks it.
    """
    query_ids = np.asarray(query_ids, dtype=np.int64)
    ids = np.repeat(query_ids[:, None], k, axis=1)  # [P, K]
    valid = np.zeros((len(query_ids), k), dtype=bool)
    for p, negs in enumerate(lists):
        negs = list(negs or [])[:k]
        ids[p, :len(negs)] = negs
        valid[p, :len(negs)] = True
    return ids, valid


def check_negatives(pairs_path: str | Path, k: int) -> None:
    """Fail in one line when `data.hard_negatives` = k > 0 but the training pairs have no negatives."""
    from core.data.schema import DataError

    if k and (not Path(pairs_path).exists() or NEGATIVES_COLUMN not in pq.read_schema(pairs_path).names):
        raise DataError(f"{pairs_path}: data.hard_negatives={k} needs a {NEGATIVES_COLUMN} column; mine it with "
                        f"python -m rayjobs.mine_negatives --checkpoint RUN/export --data DATA --out NEW_DATA "
                        f"and train on NEW_DATA")
