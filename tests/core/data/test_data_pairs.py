"""Pair mining on hand-computed click logs (REFERENCE §2)."""

import math

import pyarrow as pa
import pytest

from core.data.pairs import mine_pairs, rank_within_groups


def events(rows):
    u, a, b = zip(*rows)
    return pa.table({"user_id": list(u), "viewed_note_id": list(a), "clicked_note_id": list(b), "extra": ["x"] * len(rows)})


def as_tuples(table):
    return [(r["query_id"], r["target_id"], r["score"]) for r in table.to_pylist()]


def test_nu_weighting_repeats_and_self_clicks():
    log = events([
        (1, 10, 11), (1, 10, 11), (1, 11, 12),  # user 1: repeat counts once; clicked {11, 12} -> N=2
        (1, 13, 13),                            # A->A ignored, and 13 is not counted in N_1
        (2, 10, 11), (2, 10, 12), (2, 10, 13), (2, 12, 12),  # user 2: clicked {11, 12, 13} -> N=3
    ])
    got = as_tuples(mine_pairs(log, top_t=10))
    want = [(10, 11, 1 / 2 + 1 / 3), (10, 12, 1 / 3), (10, 13, 1 / 3), (11, 12, 1 / 2)]
    assert [(q, t) for q, t, _ in got] == [(q, t) for q, t, _ in want]
    for (_, _, s), (_, _, w) in zip(got, want):
        assert math.isclose(s, w, abs_tol=1e-12)
    assert mine_pairs(log, top_t=10).schema.field("score").type == pa.float64()


def test_bounds_inclusive_ties_by_target_id_and_top_t():
    # user 7 clicks 4 distinct notes -> each of its pairs scores exactly 0.25
    log = events([(7, 1, 5), (7, 1, 3), (7, 1, 4), (7, 1, 2), (8, 1, 9)])  # user 8: N=1 -> s(1->9)=1
    full = as_tuples(mine_pairs(log, top_t=10))
    assert full == [(1, 9, 1.0), (1, 2, 0.25), (1, 3, 0.25), (1, 4, 0.25), (1, 5, 0.25)]
    assert as_tuples(mine_pairs(log, lower=0.25, upper=0.25, top_t=10)) == [(1, 2, 0.25), (1, 3, 0.25), (1, 4, 0.25), (1, 5, 0.25)]
    assert as_tuples(mine_pairs(log, lower=0.26, upper=1.0, top_t=10)) == [(1, 9, 1.0)]
    assert as_tuples(mine_pairs(log, top_t=2)) == [(1, 9, 1.0), (1, 2, 0.25)]
    assert as_tuples(mine_pairs(log, upper=0.5, top_t=3)) == [(1, 2, 0.25), (1, 3, 0.25), (1, 4, 0.25)]


def test_float_sums_tie_exactly_and_sort_order():
    # s(1->2) = 1/3 + 1/6 (users 1, 2), s(1->3) = 1/6 + 1/3 (users 2, 1): equal after rounding
    log = events([(1, 1, 2), (1, 1, 3), (1, 0, 4),
                  (2, 1, 2), (2, 1, 3), (2, 0, 5), (2, 0, 6), (2, 0, 7), (2, 0, 8)])
    # N_1 = 3 ({2,3,4}), N_2 = 6 -> s(1->2) = s(1->3) = 1/3 + 1/6 = 0.5
    out = as_tuples(mine_pairs(log, top_t=10))
    assert [(q, t) for q, t, _ in out] == [(0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (1, 2), (1, 3)]
    assert out[-1][2] == out[-2][2] == 0.5


def test_empty_and_invalid_arguments():
    assert mine_pairs(events([(1, 2, 2)]), top_t=3).num_rows == 0
    with pytest.raises(ValueError):
        mine_pairs(events([(1, 2, 3)]), top_t=0)
    with pytest.raises(ValueError):
        mine_pairs(events([(1, 2, 3)]), lower=2, upper=1)


def test_rank_within_groups():
    import numpy as np

    assert rank_within_groups(np.array([1, 1, 1, 4, 4, 9])).tolist() == [0, 1, 2, 0, 1, 0]


def brute_force_pairs(rows, lower, upper, top_t):
    """REFERENCE §2 in plain Python: exact rational scores (ties, order); bounds on the score
    rounded to 12 decimals, as `mine_pairs` documents."""
    from collections import defaultdict
    from fractions import Fraction

    rows = [r for r in rows if None not in r and r[1] != r[2]]
    clicked = defaultdict(set)
    for u, _, b in rows:
        clicked[u].add(b)
    users = defaultdict(set)
    for u, a, b in rows:
        users[(a, b)].add(u)
    scores = {ab: sum(Fraction(1, len(clicked[u])) for u in us) for ab, us in users.items()}
    by_query = defaultdict(list)
    for (a, b), s in scores.items():
        if lower <= round(float(s), 12) <= upper:
            by_query[a].append((-s, b))
    out = []
    for a in sorted(by_query):
        for neg_s, b in sorted(by_query[a])[:top_t]:
            out.append((a, b, -neg_s))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_random_logs(seed, monkeypatch):
    import numpy as np

    import core.data.pairs as pairs

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    n_users, n_notes = int(rng.integers(1, 30)), int(rng.integers(2, 25))
    if seed % 2:  # arbitrary (sparse, negative, huge) int64 ids: the hash-encoded path
        user_ids = rng.integers(-2**62, 2**62, n_users)
        note_ids = rng.integers(-2**62, 2**62, n_notes)
    else:
        user_ids, note_ids = np.arange(n_users) + 1000, np.arange(n_notes) * 3
    if seed % 4 == 3:  # force re-coding of packed keys (the path for very many distinct ids)
        monkeypatch.setattr(pairs, "_PACK_BITS", 6)
    rows = [(int(user_ids[rng.integers(n_users)]), int(note_ids[rng.integers(n_notes)]), int(note_ids[rng.integers(n_notes)]))
            for _ in range(n)]
    rows += rows[: n // 5]  # repeated identical events
    if seed % 3 == 0:
        rows.append((None, int(note_ids[0]), int(note_ids[1])))
    table = pa.table({"user_id": pa.array([r[0] for r in rows], pa.int64()),
                      "viewed_note_id": [r[1] for r in rows], "clicked_note_id": [r[2] for r in rows]})
    for lower, upper, top_t in [(0.0, float("inf"), 1), (0.0, float("inf"), 3), (0.1, 0.5, 2), (0.25, 1.0, 50)]:
        got = as_tuples(mine_pairs(table, lower=lower, upper=upper, top_t=top_t))
        want = brute_force_pairs(rows, lower, upper, top_t)
        assert [(q, t) for q, t, _ in got] == [(q, t) for q, t, _ in want], (seed, lower, upper, top_t)
        assert all(math.isclose(s, float(w), abs_tol=1e-12) for (_, _, s), (_, _, w) in zip(got, want))


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: scores >= 4096 take the dense-rank path
def test_order_by_query_then_score_matches_lexsort(scale):
    import numpy as np

    from core.data.pairs import SCORE_DECIMALS, _order_by_query_then_score

    rng = np.random.default_rng(0)
    q = np.sort(rng.integers(0, 50, 2000))
    score = np.round(rng.integers(1, 7, 2000) / rng.integers(1, 7, 2000) * scale, SCORE_DECIMALS)
    np.testing.assert_array_equal(_order_by_query_then_score(q, 50, score), np.lexsort((-score, q)))
