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
