"""Train/test split without leakage, greedy test de-duplication, short flags."""

import numpy as np
import pyarrow as pa
import pytest

from core.data.split import dedupe_test_pairs, flag_short, is_short_text, split_pairs


def random_pairs(n=600, notes=120, seed=0):
    rng = np.random.default_rng(seed)
    q, t = rng.integers(0, notes, n), rng.integers(0, notes, n)
    keep = q != t
    return pa.table({"query_id": q[keep], "target_id": t[keep], "score": rng.random(keep.sum())})


def test_split_has_no_leakage_and_is_seeded():
    pairs = random_pairs()
    train, val, test, stats = split_pairs(pairs, test_fraction=0.2, val_fraction=0.1, seed=3)
    test_q, val_q = set(test["query_id"].to_pylist()), set(val["query_id"].to_pylist())
    assert test_q and val_q and train.num_rows
    assert not test_q & val_q  # disjoint held-out query sets
    for held in (test_q, val_q):
        assert not held & set(train["query_id"].to_pylist())
        assert not held & set(train["target_id"].to_pylist())
    assert not test_q & set(val["target_id"].to_pylist())  # choosing never sees a test query
    assert (train.num_rows + val.num_rows + test.num_rows + stats["dropped_leaky"] + stats["dropped_val_leaky"]
            == pairs.num_rows)
    n_queries = len(set(pairs["query_id"].to_pylist()))
    assert stats["test_queries"] == round(0.2 * n_queries) and stats["val_queries"] == round(0.1 * n_queries)
    again, again_val, _, _ = split_pairs(pairs, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert again.equals(train) and again_val.equals(val)
    other, _, _, _ = split_pairs(pairs, test_fraction=0.2, val_fraction=0.1, seed=4)
    assert not other.equals(train)
    no_val, empty_val, _, _ = split_pairs(pairs, test_fraction=0.2, seed=3)
    assert empty_val.num_rows == 0 and no_val.num_rows > train.num_rows
    with pytest.raises(ValueError, match="must be < 1"):
        split_pairs(pairs, test_fraction=0.6, val_fraction=0.4, seed=0)


def test_greedy_dedupe_each_note_once():
    test = pa.table({"query_id": [1, 1, 2, 3, 5], "target_id": [2, 3, 4, 4, 6], "score": [0.9, 0.5, 0.8, 0.7, 0.1]})
    kept = dedupe_test_pairs(test).to_pylist()
    # by score: (1,2) kept; (2,4) blocked by 2; (3,4) kept; (1,3) blocked; (5,6) kept
    assert [(r["query_id"], r["target_id"]) for r in kept] == [(1, 2), (3, 4), (5, 6)]
    big = dedupe_test_pairs(random_pairs(seed=1))
    notes = big["query_id"].to_pylist() + big["target_id"].to_pylist()
    assert len(notes) == len(set(notes))


def test_short_flags_and_threshold():
    pairs = pa.table({"query_id": [1, 2], "target_id": [2, 3], "score": [1.0, 1.0]})
    flagged = flag_short(pairs, [2])
    assert flagged["short_query"].to_pylist() == [False, True]
    assert flagged["short_target"].to_pylist() == [True, False]
    assert is_short_text("wow", "", threshold=20)
    assert not is_short_text("a long enough title", "and content", threshold=20)
    # the title is cut to 20 characters before measuring (official preprocessing)
    assert is_short_text("x" * 30, "", threshold=21)
