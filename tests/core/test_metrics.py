"""Exact ranks and Recall@K against a brute-force full sort; the FAISS path against exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.metrics import (
    approximate_recall_at_k,
    approximate_target_ranks,
    flatten_recall,
    flatten_recall_ci,
    format_recall,
    format_recall_ci,
    metric_key,
    paired_recall_ci,
    parse_dim_metric_key,
    parse_metric_key,
    query_hits,
    recall_at_k,
    recall_ci,
    recall_from_ranks,
    recall_report,
    target_rank_counts,
    target_ranks,
    unflatten_recall,
)


def brute_force_ranks(q: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Reference: sort every query's full score row, rank = first position holding the target's
    score (a stable descending sort puts all ties at the same start, matching 'strictly higher')."""
    scores = (q.double() @ c.double().T)  # [Q, C]
    ranks = []
    for i in range(q.shape[0]):
        row = scores[i]
        order = torch.argsort(row, descending=True, stable=True)
        sorted_scores = row[order]
        # Position of the first score equal to the target's: the number strictly above it.
        ranks.append(int((sorted_scores > row[t[i]]).sum()))
    return torch.tensor(ranks)


def brute_force_recall(q, c, t, ks):
    ranks = brute_force_ranks(q, c, t)
    return {k: float((ranks < k).double().mean()) for k in ks}


def tied_data(seed: int, n_query: int = 40, n_cand: int = 300, dim: int = 6):
    """Small-integer embeddings: dot products are exact in float32 and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (n_query, dim), generator=g).float()
    c = torch.randint(-2, 3, (n_cand, dim), generator=g).float()
    c[1] = c[0]  # duplicate candidate rows: an exact tie with whichever is the target
    t = torch.randint(0, n_cand, (n_query,), generator=g)
    t[:5] = 0
    return q, c, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_full_sort_with_exact_ties(seed):
    q, c, t = tied_data(seed)
    ranks = target_ranks(q, c, t, chunk_size=37, query_chunk_size=7)
    assert torch.equal(ranks, brute_force_ranks(q, c, t))
    # The duplicated row 1 ties the target row 0 and so must not push it down.
    scores_equal = (q[:5] @ c[1]) == (q[:5] @ c[0])
    assert scores_equal.all()


def test_recall_matches_brute_force_random_floats():
    g = torch.Generator().manual_seed(3)
    q, c = torch.randn(64, 16, generator=g), torch.randn(500, 16, generator=g)
    t = torch.randint(0, 500, (64,), generator=g)
    ks = [1, 5, 10, 50, 100, 499, 500, 1000]
    got = recall_at_k(q, c, t, ks, chunk_size=64)
    want = brute_force_recall(q, c, t, ks)
    assert got == pytest.approx(want, abs=1e-12)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    q, c = torch.randn(50, 8, generator=g), torch.randn(1000, 8, generator=g)
    t = torch.randint(0, 1000, (50,), generator=g)
    full = target_ranks(q, c, t, chunk_size=10**6, query_chunk_size=10**6)
    for cs, qs in [(1, 50), (7, 3), (999, 1), (1000, 50)]:
        assert torch.equal(target_ranks(q, c, t, chunk_size=cs, query_chunk_size=qs), full)


def test_collapsed_model_scores_chance_not_one():
    """All embeddings equal: every candidate ties with the target. Under expected ties Recall@K is
    K / |pool| (the pre-0.2 strictly-higher rule gave 1.0); pessimistic gives 0, optimistic 1."""
    q = torch.ones(3, 4)
    c = torch.ones(10, 4)
    t = torch.tensor([0, 5, 9])
    above, tied = target_rank_counts(q, c, t)
    assert above.tolist() == [0, 0, 0] and tied.tolist() == [9, 9, 9]  # the target is no tie of itself
    assert target_ranks(q, c, t).tolist() == [0, 0, 0]
    assert recall_at_k(q, c, t, [1, 3])[1] == pytest.approx(1 / 10)
    assert recall_at_k(q, c, t, [1, 3])[3] == pytest.approx(3 / 10)
    assert recall_at_k(q, c, t, [1], ties="pessimistic") == {1: 0.0}
    assert recall_at_k(q, c, t, [1], ties="optimistic") == {1: 1.0}


def brute_force_tie_counts(q, c, t):
    scores = q.double() @ c.double().T  # [Q, C]
    tgt = scores[torch.arange(len(t)), t][:, None]
    tied = (scores == tgt).sum(dim=1) - 1  # minus the target itself
    return (scores > tgt).sum(dim=1), tied


def expected_recall_by_enumeration(above: int, tied: int, k: int) -> float:
    """Average hit over every place the target can take among its tied block (uniform tie-breaking)."""
    return sum(1.0 for place in range(tied + 1) if above + place < k) / (tied + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_tie_counts_and_expected_recall_match_enumeration(seed):
    q, c, t = tied_data(seed)
    above, tied = target_rank_counts(q, c, t, chunk_size=29, query_chunk_size=6)
    want_above, want_tied = brute_force_tie_counts(q, c, t)
    assert torch.equal(above, want_above) and torch.equal(tied, want_tied)
    assert int(tied.sum()) > 0  # the data really has ties
    for k in (1, 3, 10, 50):
        hits = query_hits(above, tied, k)
        want = [expected_recall_by_enumeration(int(a), int(e), k) for a, e in zip(above, tied)]
        assert hits.tolist() == pytest.approx(want, abs=1e-12)
        assert (query_hits(above, tied, k, "pessimistic") <= hits).all()
        assert (hits <= query_hits(above, tied, k, "optimistic")).all()
    with pytest.raises(ValueError, match="ties="):
        query_hits(above, tied, 1, "random")


def test_bootstrap_interval_covers_true_recall():
    """200 simulated replicates of 150 queries with true per-query hit rate 0.3: the 95 % interval
    covers 0.3 in at least 90 % of them (the percentile bootstrap is near-nominal at this size)."""
    rng = np.random.default_rng(7)
    covered = 0
    for rep in range(200):
        hits = (rng.random(150) < 0.3).astype(np.float64)
        lo, hi = recall_ci(hits, n_boot=500, seed=rep)
        assert lo <= hits.mean() <= hi
        covered += lo <= 0.3 <= hi
    assert covered >= 180, covered
    assert recall_ci(np.ones(20)) == (1.0, 1.0)
    assert all(math.isnan(v) for v in recall_ci(np.zeros(0)))
    assert recall_ci(hits, seed=3) == recall_ci(hits, seed=3)  # seeded: reproducible


def test_paired_interval_sees_a_small_consistent_gain():
    """Model a beats b on 10 of 200 queries and never loses: the paired interval excludes zero
    although the two unpaired intervals overlap."""
    rng = np.random.default_rng(0)
    b = (rng.random(200) < 0.5).astype(np.float64)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:10]] = 1.0
    lo, hi = paired_recall_ci(a, b)
    assert 0.0 < lo <= 0.05 <= hi
    (alo, _), (_, bhi) = recall_ci(a), recall_ci(b)
    assert alo < bhi  # unpaired intervals overlap
    with pytest.raises(ValueError, match="align"):
        paired_recall_ci(a, b[:-1])


def test_metric_keys_have_one_home():
    assert metric_key("all", 10) == "R@10" and metric_key("short_query", 100) == "short_query/R@100"
    assert parse_metric_key("short_target/R@5") == ("short_target", 5)
    assert parse_metric_key("all/R@5") == ("all", 5) and parse_metric_key("loss") is None
    nested = {"all": {"R@10": 0.5, "R@1000": None}, "short_query": {"R@10": 0.25}, "num_queries": 4}
    flat = flatten_recall(nested)
    assert flat == {"R@10": 0.5, "short_query/R@10": 0.25}
    assert unflatten_recall(flat) == {"all": {"R@10": 0.5}, "short_query": {"R@10": 0.25}}
    assert unflatten_recall({"val/R@10": 0.1, "test/R@10": 0.2}, prefix="test/") == {"all": {"R@10": 0.2}}
    with pytest.raises(ValueError, match="subset"):
        metric_key("long_query", 10)
    assert format_recall_ci(0.312, [0.271, 0.354]) == "31.2 (27.1–35.4)"
    assert format_recall_ci(None, [0.1, 0.2]) == "n/a"


def test_matryoshka_dims_are_a_key_component():
    assert metric_key("all", 10, dim=16) == "dim16/R@10"
    assert metric_key("short_query", 5, dim=8) == "dim8/short_query/R@5"
    assert parse_dim_metric_key("dim8/short_query/R@5") == (8, "short_query", 5)
    assert parse_dim_metric_key("R@5") == (None, "all", 5) and parse_dim_metric_key("dim8/loss") is None
    assert parse_metric_key("dim8/R@5") is None  # what chooses (eval.metric) reads the full embedding
    # JSON round trips turn the "dims" keys into strings; both read the same
    nested = {"all": {"R@10": 0.5}, "ci95": {"all": {"R@10": [0.4, 0.6]}},
              "dims": {"8": {"all": {"R@10": 0.25}, "short_target": {"R@10": 0.125}, "ci95": {"all": {"R@10": [0.2, 0.3]}}}}}
    flat = flatten_recall(nested)
    assert flat == {"R@10": 0.5, "dim8/R@10": 0.25, "dim8/short_target/R@10": 0.125}
    assert flatten_recall_ci(nested) == {"R@10 lo": 0.4, "R@10 hi": 0.6, "dim8/R@10 lo": 0.2, "dim8/R@10 hi": 0.3}
    assert unflatten_recall(flat) == {"all": {"R@10": 0.5}, "dims": {8: {"all": {"R@10": 0.25},
                                                                        "short_target": {"R@10": 0.125}}}}


def test_hand_made_ranks():
    # Query scores against candidates: [3, 1, 2, 2]; target 2 (score 2) has one strictly higher.
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 5.0], [2.0, -5.0]])
    assert target_ranks(q, c, torch.tensor([2])).tolist() == [1]
    assert target_ranks(q, c, torch.tensor([1])).tolist() == [3]
    # candidate 3 ties the target's score 2: under expected ties the target takes place 2 or 3
    assert recall_at_k(q, c, torch.tensor([2]), [1, 2, 3]) == {1: 0.0, 2: 0.5, 3: 1.0}
    assert recall_at_k(q, c, torch.tensor([2]), [1, 2], ties="optimistic") == {1: 0.0, 2: 1.0}


def test_k_beyond_pool_is_one_in_contract_but_na_in_report():
    q, c, t = tied_data(5, n_cand=20)
    assert recall_at_k(q, c, t, [20, 50])[50] == 1.0
    report = recall_report(target_ranks(q, c, t), [10, 20, 50], pool_size=20)
    assert report["R@50"] is None
    assert report["R@20"] == 1.0
    assert format_recall(report["R@50"]) == "n/a"
    assert format_recall(0.74612) == "74.61"


def test_no_queries():
    out = recall_from_ranks(torch.zeros(0, dtype=torch.long), [1, 10])
    assert all(math.isnan(v) for v in out.values())
    assert recall_report(torch.zeros(0, dtype=torch.long), [1], pool_size=5) == {"R@1": None}


def test_bad_inputs_raise():
    q, c = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="target_index"):
        target_ranks(q, c, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="dim"):
        target_ranks(q, torch.randn(5, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target_index"):
        target_ranks(q, c, torch.tensor([0, 1]))


def clustered_data(n_clusters=50, per_cluster=80, dim=32, n_query=200, seed=0):
    """Unit vectors around cluster centres; each query's target is a near neighbour in its cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    cand = np.repeat(centres, per_cluster, axis=0) + 0.3 * rng.standard_normal((n_clusters * per_cluster, dim))
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    target = rng.choice(len(cand), n_query, replace=False)
    query = cand[target] + 0.15 * rng.standard_normal((n_query, dim))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    return torch.tensor(query, dtype=torch.float32), torch.tensor(cand, dtype=torch.float32), torch.tensor(target)


@pytest.mark.parametrize("kind,kw", [("hnsw", {"ef_search": 128}), ("ivf", {"nprobe": 8})])
def test_faiss_close_to_exact_on_clustered_data(kind, kw):
    pytest.importorskip("faiss")
    q, c, t = clustered_data()
    out = approximate_recall_at_k(q, c, t, [1, 10, 100], kind, compare_exact=True, **kw)
    assert set(out) == {"recall", "exact", "recall_loss"}
    for k in (1, 10, 100):
        assert abs(out["recall_loss"][k]) <= 0.05, (kind, k, out)
        assert out["recall_loss"][k] == pytest.approx(out["exact"][k] - out["recall"][k])
    assert out["exact"][100] > 0.5  # the data is easy enough for the comparison to mean something


def test_faiss_ranks_mark_missing_targets():
    pytest.importorskip("faiss")
    q, c, t = clustered_data(n_query=20)
    ranks = approximate_target_ranks(q, c, t, max_k=3, kind="hnsw")
    exact = target_ranks(q, c, t)
    assert ranks.shape == (20,) and ranks.max() <= 3
    # Where the exact rank is beyond the list, the approximate one says "not retrieved".
    assert np.all(ranks[exact.numpy() >= 3] == 3)


def test_missing_faiss_gives_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *a, **kw):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        approximate_recall_at_k(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), [1])


def near_tie_data(seed: int, n_query: int = 16, n_cand: int = 1500, dim: int = 576):
    """Gaussian data where many candidates sit within float32 rounding of a target's score:
    exact duplicates of targets, targets nudged by one float32 ulp in one coordinate (score gaps
    ~1e-7 relative, below float32 matmul error but far above float64 error), and scaled copies."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_query, dim, generator=g)
    c = torch.randn(n_cand, dim, generator=g)
    t = torch.randperm(n_cand, generator=g)[:n_query]
    free = [j for j in range(n_cand) if j not in set(t.tolist())]
    pos = 0
    for i in range(n_query):
        src = c[t[i]]
        for kind in range(6):
            j = free[pos]
            pos += 1
            row = src.clone()
            if kind in (1, 2, 3, 4):  # one-ulp nudge of one coordinate, up or down
                k = int(torch.randint(0, dim, (1,), generator=g))
                direction = math.inf if kind % 2 else -math.inf
                row[k] = torch.nextafter(row[k], torch.tensor(direction))
            elif kind == 5:
                row = row * (1 + 2 ** -23)  # a near-parallel copy
            c[j] = row  # kind 0: an exact duplicate
    return q, c, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_path_exact_on_near_ties(seed):
    q, c, t = near_tie_data(seed)
    want = brute_force_ranks(q, c, t)
    assert torch.equal(target_ranks(q, c, t), want)
    assert torch.equal(target_ranks(q, c, t, score_dtype=torch.float64), want)
    for cs, qs in [(1000, 5), (257, 16), (1500, 1)]:
        assert torch.equal(target_ranks(q, c, t, chunk_size=cs, query_chunk_size=qs), want)


def test_float32_path_float64_inputs_and_reduced_matmul_precision():
    q, c, t = near_tie_data(3, n_query=8, n_cand=800, dim=64)
    want = brute_force_ranks(q, c, t)
    assert torch.equal(target_ranks(q.double(), c.double(), t, chunk_size=100), want)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "medium"):  # wider (TF32/bf16) margins, or the float64 fallback
            torch.set_float32_matmul_precision(precision)
            assert torch.equal(target_ranks(q, c, t, chunk_size=100), want)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_path_random_with_duplicates_matches_float64(seed):
    g = torch.Generator().manual_seed(seed)
    q, c = torch.randn(100, 32, generator=g), torch.randn(5000, 32, generator=g)
    c[2500:2600] = c[:100]  # duplicated candidates: exact ties with targets 0..99
    t = torch.arange(100)
    want = brute_force_ranks(q, c, t)
    assert torch.equal(target_ranks(q, c, t, chunk_size=999, query_chunk_size=33), want)
    assert torch.equal(target_ranks(q, c, t, score_dtype=torch.float64), want)
