"""Related-pair mining from a click log by weighted co-occurrence (REFERENCE §2).

Semantics, exactly:

- Events with viewed == clicked (A→A) are dropped first; they carry no relation.
- N_u = the number of distinct notes user u clicked, counted over u's remaining (non-A→A)
  events. (A note u only ever "clicked" from itself is not a click on anything else.)
- s(A→B) = Σ 1/N_u over the distinct users u with at least one (u, A, B) event; repeated
  identical events of one user count once.
- Keep lower ≤ s ≤ upper (both inclusive), then the `top_t` highest s per A, ties broken by
  B's id ascending.

Scores are float sums whose order is an implementation detail, so they are rounded to 12
decimal places: equal true sums (1/3 + 1/6 and 1/6 + 1/3) then compare equal for ties and bounds.

Implementation: NumPy on packed int64 keys, no Python loop over rows and no multi-column
hash group-by. Each id column becomes a dense order-preserving code (its offset from the column
minimum when the id range is small, else a hash-encoded rank); (u, B, A) is packed into one int64
and deduplicated by one sort, which also groups (u, B) for N_u; (A, B, u) is packed and sorted
once more to sum 1/N_u per (A, B) with `np.add.reduceat`; one stable two-key sort orders the
kept pairs by (A asc, s desc) with B asc inside ties, and a rank-within-group keeps `top_t`.
Memory stays a few int64 arrays of the input's length.
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
    cols = [events.column(name).cast(pa.int64()) for name in ("user_id", "viewed_note_id", "clicked_note_id")]
    if any(c.null_count for c in cols):
        valid = pc.and_(pc.and_(pc.is_valid(cols[0]), pc.is_valid(cols[1])), pc.is_valid(cols[2]))
        cols = [c.filter(valid) for c in cols]
    u, a, b = (_to_numpy(c) for c in cols)
    keep = a != b  # A->A events carry no relation
    if not keep.all():
        u, a, b = u[keep], a[keep], b[keep]
    if len(u) == 0:
        return PAIR_SCHEMA.empty_table()

    u, nu, _ = _dense_codes(u)
    a, na, a_ids = _dense_codes(a)
    b, nb, b_ids = _dense_codes(b)

    # Distinct (u, B, A), sorted: (u, B) runs are contiguous, so N_u = number of (u, B) runs of u.
    ub, n_ub, ub_ids = _pack(u, nu, b, nb)
    key, _, key_ids = _pack(ub, n_ub, a, na)
    del u, b
    key.sort()  # one sort + dedupe (np.unique hashes first on NumPy >= 2.3: slower here)
    key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    ub_k, a_k = _unpack(key, na, key_ids)
    del key
    ub_start = np.empty(len(ub_k), dtype=bool)
    ub_start[0] = True
    np.not_equal(ub_k[1:], ub_k[:-1], out=ub_start[1:])
    u_k, b_k = _unpack(ub_k, nb, ub_ids)
    del ub_k
    with np.errstate(divide="ignore"):  # users with no kept event get inf, and are never looked up
        inv_n = 1.0 / np.bincount(u_k[ub_start], minlength=nu)  # 1 / N_u
    del ub_start

    # Sum 1/N_u per (A, B): sort the distinct (A, B, u) keys, reduce each (A, B) run.
    ab, n_ab, ab_ids = _pack(a_k, na, b_k, nb)
    del a_k, b_k
    key, _, key_ids = _pack(ab, n_ab, u_k, nu)
    del ab, u_k
    key.sort()
    ab, u_k = _unpack(key, nu, key_ids)
    del key
    w = inv_n[u_k]
    del u_k
    starts = np.flatnonzero(np.concatenate(([True], ab[1:] != ab[:-1])))
    score = np.round(np.add.reduceat(w, starts), SCORE_DECIMALS)
    ab = ab[starts]
    del w, starts

    keep = (score >= lower) & (score <= upper)
    if not keep.all():
        ab, score = ab[keep], score[keep]
    q_code, t_code = _unpack(ab, nb, ab_ids)
    del ab
    # Rows are in (A, B) order; a stable sort by (A asc, s desc) keeps B asc inside ties.
    order = _order_by_query_then_score(q_code, na, score)
    q_code, t_code, score = q_code[order], t_code[order], score[order]
    rank = rank_within_groups(q_code)
    top = rank < top_t
    if not top.all():
        q_code, t_code, score = q_code[top], t_code[top], score[top]
    return pa.table({"query_id": a_ids(q_code), "target_id": b_ids(t_code), "score": score}, schema=PAIR_SCHEMA)


_PACK_BITS = 62


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    return col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64, copy=False) if col.num_chunks != 1 \
        else col.chunk(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _dense_codes(x: np.ndarray):
    """Order-preserving codes in [0, n) of int64 ids, n, and a function mapping codes back to ids.

    The offset from the minimum when the id range is at most ~the number of rows (no hashing);
    otherwise the rank of the id among the distinct ids (hash-encoded, then the distinct ids sorted).
    """
    lo, hi = int(x.min()), int(x.max())
    span = hi - lo + 1
    if span <= max(2 * len(x), 1 << 16):
        return x - lo, span, (lambda c, lo=lo: c + lo)
    enc = pc.dictionary_encode(pa.array(x))
    ids = enc.dictionary.to_numpy()
    order = np.argsort(ids, kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids), dtype=np.int64)
    sorted_ids = ids[order]
    return rank[enc.indices.to_numpy()], len(ids), (lambda c, s=sorted_ids: s[c])


def _bits(n: int) -> int:
    """Bits needed for codes in [0, n)."""
    return max(int(n - 1).bit_length(), 1)


def _pack(x: np.ndarray, nx: int, y: np.ndarray, ny: int):
    """One int64 key per row ordering like (x, y), its range n, and what `_unpack` needs.

    (x << bits(ny)) | y while the two ranges fit in 62 bits together (the usual case: codes are
    below ~2x the number of rows); otherwise the distinct (x, y) pairs are numbered in order
    (a two-key sort) and `_unpack` maps a number back through the kept distinct pairs.
    """
    by = _bits(ny)
    if _bits(nx) + by <= _PACK_BITS:
        return (x << by) | y, nx << by, None
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    new = np.ones(len(xs), dtype=bool)
    new[1:] = (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])
    code = np.empty(len(xs), dtype=np.int64)
    code[order] = np.cumsum(new) - 1
    return code, int(new.sum()), (xs[new], ys[new])


def _unpack(key: np.ndarray, ny: int, ids):
    """Inverse of `_pack`: the (x, y) codes of packed keys."""
    if ids is not None:
        return ids[0][key], ids[1][key]
    by = _bits(ny)
    return key >> by, key & ((1 << by) - 1)


def _order_by_query_then_score(q_code: np.ndarray, nq: int, score: np.ndarray) -> np.ndarray:
    """Stable order of rows by (query asc, score desc): rows already by target asc stay so in ties.

    Scores are rounded to 12 decimals, so below 4096 they map exactly and monotonically to the
    integers rint(s * 1e12) (< 2^53); packed with the query code they sort as one int64 key.
    Otherwise the scores are first replaced by their dense rank (one more sort).
    """
    if len(score) == 0:
        return np.zeros(0, dtype=np.int64)
    top = float(score.max())
    if top < 4096.0:
        k = np.rint(score * 1e12).astype(np.int64)
        k_max = int(k.max())
        n_k = k_max + 1
        desc = k_max - k
    else:
        ranks, inv = np.unique(score, return_inverse=True)
        n_k = len(ranks)
        desc = (n_k - 1) - inv.reshape(-1).astype(np.int64, copy=False)
    if _bits(nq) + _bits(n_k) > _PACK_BITS:  # too many distinct scores to pack: two stable sorts
        return np.lexsort((-score, q_code))
    return np.argsort((q_code << _bits(n_k)) | desc, kind="stable")


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
