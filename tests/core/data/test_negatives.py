"""core.data.negatives: mined negatives against a brute-force reading of the rules, and their batch slots."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.data.negatives import mine_hard_negatives, negative_slots, parse_rank_range
from core.related_index import finalize_embeddings


def _corpus(seed=0, n=40, d=6):
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    emb = finalize_embeddings(rng.normal(size=(n, d)))
    q = rng.choice(ids, 30)
    t = np.array([rng.choice(ids[ids != x]) for x in q])
    pairs = pa.table({"query_id": q, "target_id": t, "score": rng.random(30)})
    viewed = rng.choice(ids, 60)
    clicked = rng.choice(ids, 60)
    events = pa.table({"user_id": np.zeros(60, dtype=np.int64), "viewed_note_id": viewed, "clicked_note_id": clicked})
    return ids, emb, pairs, events


def _brute_force_eligible(ids, emb, pairs, events, p, lo, hi, margin):
    """The rules of core.data.negatives, read literally for pair p: rank every other note by score."""
    q, t = int(pairs["query_id"][p].as_py()), int(pairs["target_id"][p].as_py())
    row = {int(x): i for i, x in enumerate(ids)}
    scores = emb @ emb[row[q]]
    others = [int(x) for x in ids if x != q]
    others.sort(key=lambda x: -scores[row[x]])
    related = {int(b) for a, b in zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist()) if a == q}
    related |= {int(a) for a, b in zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist()) if b == q}
    co = {int(b) for a, b in zip(events["viewed_note_id"].to_pylist(), events["clicked_note_id"].to_pylist()) if a == q}
    co |= {int(a) for a, b in zip(events["viewed_note_id"].to_pylist(), events["clicked_note_id"].to_pylist()) if b == q}
    pos = scores[row[t]]
    return [c for r, c in enumerate(others) if lo <= r < hi and c not in related and c not in co
            and scores[row[c]] < pos - margin * abs(pos)]


@pytest.mark.parametrize("lo, hi, margin", [(0, 39, 0.0), (3, 20, 0.05), (5, 12, 0.3)])
def test_negatives_are_exactly_the_notes_the_rules_allow(lo, hi, margin):
    ids, emb, pairs, events = _corpus()
    out, report = mine_hard_negatives(pairs, events, ids, emb, num_negatives=100, rank_range=(lo, hi),
                                      relative_margin=margin)
    assert out["query_id"].to_pylist() == pairs["query_id"].to_pylist()  # row order kept
    got = out["negative_ids"].to_pylist()
    for p in range(pairs.num_rows):
        assert sorted(got[p]) == sorted(_brute_force_eligible(ids, emb, pairs, events, p, lo, hi, margin)), p
    # every candidate seen is either kept or removed by exactly one rule
    kept = sum(len(n) for n in got)
    assert report.eligible == kept  # K above every count: nothing sampled away
    assert report.candidates_seen == kept + sum(v for k, v in report.removed.items() if k != "query")
    assert report.removed["query"] == pairs.num_rows and report.candidates_seen == pairs.num_rows * min(hi, 39)
    assert report.removed["positive"] > 0 and report.removed["co_occurring"] > 0


def test_a_sample_of_k_is_seeded_distinct_and_drawn_from_the_eligible():
    ids, emb, pairs, events = _corpus(seed=1)
    everything, _ = mine_hard_negatives(pairs, events, ids, emb, num_negatives=100, rank_range=(2, 30))
    a, report = mine_hard_negatives(pairs, events, ids, emb, num_negatives=3, rank_range=(2, 30), seed=5)
    b, _ = mine_hard_negatives(pairs, events, ids, emb, num_negatives=3, rank_range=(2, 30), seed=5)
    c, _ = mine_hard_negatives(pairs, events, ids, emb, num_negatives=3, rank_range=(2, 30), seed=6)
    assert a["negative_ids"].to_pylist() == b["negative_ids"].to_pylist() != c["negative_ids"].to_pylist()
    for sample, full in zip(a["negative_ids"].to_pylist(), everything["negative_ids"].to_pylist()):
        assert len(set(sample)) == len(sample) == min(3, len(full)) and set(sample) <= set(full)
    assert report.negatives_per_pair["max"] == 3
    assert report.pairs_short_of_k == sum(len(f) < 3 for f in everything["negative_ids"].to_pylist())


def test_bad_settings_and_unknown_ids_fail_in_one_line():
    ids, emb, pairs, events = _corpus()
    with pytest.raises(ValueError, match="no embedding"):
        mine_hard_negatives(pairs, events, ids[:-5], emb[:-5])
    with pytest.raises(ValueError, match="relative_margin"):
        mine_hard_negatives(pairs, events, ids, emb, relative_margin=1.0)
    assert parse_rank_range("10:100") == (10, 100)
    for bad in ("10", "5:5", "a:b", "-1:4"):
        with pytest.raises(ValueError, match="rank range"):
            parse_rank_range(bad)


def test_slots_pad_short_lists_with_the_query_and_mark_them_empty():
    ids, valid = negative_slots([[5, 6, 7], [8], []], np.array([1, 2, 3]), k=2)
    assert ids.tolist() == [[5, 6], [8, 2], [3, 3]]
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
