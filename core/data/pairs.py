"""Related-pair mining from a click log by weighted co-occurrence (REFERENCE §2).

Semantics, exactly:

- Events with viewed == clicked (A→A) are dropped first; they carry no relation.
- N_u = the number of distinct notes user u clicked, counted over u's remaining (non-A→A)
  events. (A note u only ever "clicked" from itself is not a click on anything else.)
- s(A→B) = Σ 1/N_u over the distinct users u with at least one (u, A, B) event; repeated
  identical events of one user count once.
- Keep lower ≤ s ≤ upper (both inclusive), then the `top_t` highest s per A, ties broken by
  B's id ascending.

Scores are sums of floats whose order the hash aggregation does not fix, so they are rounded to
12 decimal places: equal true sums (1/3 + 1/6 and 1/6 + 1/3) then compare equal for ties and
bounds. Everything is vectorised Arrow/NumPy (hash group-by, hash join, sort): no Python loop
over rows, so tens of millions of events mine in seconds and memory stays a few times the input.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.data.schema import PAIR_SCHEMA

SCORE_DECIMALS = 12


def mine_pairs(events: pa.Table, *, lower: float = 0.0, upper: float = float("inf"), top_t: int = 10) -> pa.Table:
    """Mine related (query, target) pairs from a click log.

    Args:
        events: table with int columns `user_id`, `viewed_note_id`, `clicked_note_id` (other
            columns are ignored; rows with a null id are ignored).
        lower: smallest score kept (inclusive).
        upper: largest score kept (inclusive).
        top_t: at most this many targets per query note (>= 1).

    Returns:
        Table `query_id` int64, `target_id` int64, `score` float64, sorted by query_id asc,
        score desc, target_id asc.
    """
    if top_t < 1:
        raise ValueError(f"top_t={top_t}: must be >= 1")
    if lower > upper:
        raise ValueError(f"lower={lower} > upper={upper}: no score can be kept")
    t = pa.table({
        "u": events.column("user_id").cast(pa.int64()),
        "a": events.column("viewed_note_id").cast(pa.int64()),
        "b": events.column("clicked_note_id").cast(pa.int64()),
    })
    valid = pc.and_(pc.and_(pc.is_valid(t["u"]), pc.is_valid(t["a"])), pc.is_valid(t["b"]))
    t = t.filter(pc.and_(valid, pc.not_equal(t["a"], t["b"])))
    if t.num_rows == 0:
        return PAIR_SCHEMA.empty_table()

    uab = t.group_by(["u", "a", "b"], use_threads=True).aggregate([])  # one row per distinct (u, A, B)
    n_u = t.group_by(["u", "b"]).aggregate([]).group_by("u").aggregate([([], "count_all")])
    n_u = n_u.rename_columns(["u", "n"])
    weighted = uab.join(n_u, keys="u", join_type="inner", use_threads=True)
    weighted = weighted.append_column("w", pc.divide(pa.scalar(1.0), weighted["n"].cast(pa.float64())))
    scores = weighted.group_by(["a", "b"]).aggregate([("w", "sum")])
    # numpy, not pc.round: Arrow's round of 1/19 to 12 places returns 0.052631578947578944
    score = pa.array(np.round(scores["w_sum"].to_numpy(), SCORE_DECIMALS))
    scores = pa.table({"query_id": scores["a"], "target_id": scores["b"], "score": score})

    keep = pc.and_(pc.greater_equal(scores["score"], lower), pc.less_equal(scores["score"], upper))
    scores = scores.filter(keep)
    scores = scores.sort_by([("query_id", "ascending"), ("score", "descending"), ("target_id", "ascending")])
    rank = rank_within_groups(scores["query_id"].to_numpy())
    scores = scores.filter(pa.array(rank < top_t))
    return scores.cast(PAIR_SCHEMA)


def rank_within_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """0-based position of each row inside its run of equal keys (keys already sorted)."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    return idx - first
