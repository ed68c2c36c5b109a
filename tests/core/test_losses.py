"""core.losses against a literal, loop-by-loop transcription of REFERENCE §6, single process and
gathered over 2 gloo processes."""

from __future__ import annotations

import math

import pytest
import torch

from core.losses import matryoshka_loss, micl_loss, pair_contrastive_loss, pair_positions
from tests.gloo import run_on_gloo_ranks


def reference_loss(emb: torch.Tensor, tau: torch.Tensor, excluded: dict[int, set[int]] | None = None,
                   negatives: torch.Tensor | None = None, neg_excluded: dict[int, set[int]] | None = None) -> torch.Tensor:
    """−1/(2B) Σ_i log( exp(S_i,p(i)·e^τ) / Σ_{j≠i, j∉excluded(i)} exp(S_ij·e^τ) ), rows [q_1..q_B, t_1..t_B];
    with `negatives` [N, d] the denominator also sums their columns n ∉ neg_excluded(i).

    Written with explicit loops over rows and columns so it shares no code path with the
    vectorised implementation; it stays differentiable for the gradient comparison.
    """
    n = emb.shape[0]
    half = n // 2
    e = emb / emb.norm(dim=1, keepdim=True)
    neg = [] if negatives is None else negatives / negatives.norm(dim=1, keepdim=True)
    scale = tau.exp()
    total = emb.new_zeros(())
    for i in range(n):
        p = i + half if i < half else i - half
        denom = emb.new_zeros(())
        for j in range(n):
            if j == i or j in (excluded or {}).get(i, set()):
                continue
            denom = denom + torch.exp((e[i] @ e[j]) * scale)
        for j in range(len(neg)):
            if j not in (neg_excluded or {}).get(i, set()):
                denom = denom + torch.exp((e[i] @ neg[j]) * scale)
        total = total + torch.log(torch.exp((e[i] @ e[p]) * scale) / denom)
    return -total / n


def duplicate_columns(ids: list[int]) -> dict[int, set[int]]:
    """Columns to drop per row: same note as the row or as its positive, except the positive."""
    n = len(ids)
    half = n // 2
    out = {}
    for i in range(n):
        p = i + half if i < half else i - half
        out[i] = {j for j in range(n) if j != i and j != p and ids[j] in (ids[i], ids[p])}
    return out


def test_pair_positions():
    assert pair_positions(6).tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError):
        pair_positions(5)


@pytest.mark.parametrize("B, d, tau", [(1, 4, 3.0), (4, 8, 3.0), (7, 16, 0.5)])
def test_loss_matches_reference(B, d, tau):
    g = torch.Generator().manual_seed(B * 100 + d)
    emb = torch.randn(2 * B, d, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(tau, dtype=torch.float64)
    got = pair_contrastive_loss(emb, log_scale)
    want = reference_loss(emb, log_scale)
    assert got.dtype == torch.float32  # the loss always runs in float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got.item(), want.item())


def test_single_pair_has_zero_loss_only_without_negatives():
    # B=1: row q's only other note is its positive, so the loss is exactly 0 whatever the vectors.
    emb = torch.randn(2, 5)
    assert pair_contrastive_loss(emb, torch.tensor(3.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_log_scale_clamp():
    emb = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    clamped = pair_contrastive_loss(emb, torch.tensor(10.0), max_log_scale=math.log(100))
    direct = pair_contrastive_loss(emb, torch.tensor(math.log(100)))
    assert torch.allclose(clamped, direct)
    assert torch.allclose(pair_contrastive_loss(emb, torch.tensor(-1.0), max_log_scale=4.6),
                          pair_contrastive_loss(emb, torch.tensor(0.0)))


def test_duplicate_masking_hand_made_case():
    # Pairs (q, t): (1, 4), (2, 1), (3, 5). Note 1 is q_1 and t_2, so it appears twice.
    ids = [1, 2, 3, 4, 1, 5]
    excluded = duplicate_columns(ids)
    assert excluded == {
        0: {4},  # q_1 (note 1): t_2 is the same note as the anchor
        1: {0},  # q_2: its positive t_2 is note 1, so q_1 (also note 1) is not a negative
        2: set(),
        3: {4},  # t_1: its positive q_1 is note 1, so t_2 (note 1) is not a negative
        4: {0},  # t_2 (note 1): q_1 is itself
        5: set(),
    }
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(6, 8, generator=g, dtype=torch.float64)
    tau = torch.tensor(2.0, dtype=torch.float64)
    got = pair_contrastive_loss(emb, tau, note_ids=torch.tensor(ids))
    assert torch.allclose(got.double(), reference_loss(emb, tau, excluded), rtol=1e-5, atol=1e-6)
    # Not the unmasked value: the mask really changed something.
    assert not torch.allclose(got.double(), reference_loss(emb, tau), rtol=1e-4)


def test_distinct_ids_change_nothing():
    emb = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    tau = torch.tensor(3.0)
    assert torch.allclose(pair_contrastive_loss(emb, tau, note_ids=torch.arange(10)), pair_contrastive_loss(emb, tau))


def test_random_duplicates_match_reference():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 6, (12,), generator=g)  # many collisions
    ids[6:] = torch.where(ids[6:] == ids[:6], ids[6:] + 100, ids[6:])  # a pair is two different notes
    emb = torch.randn(12, 8, generator=g, dtype=torch.float64)
    tau = torch.tensor(1.5, dtype=torch.float64)
    got = pair_contrastive_loss(emb, tau, note_ids=ids)
    want = reference_loss(emb, tau, duplicate_columns(ids.tolist()))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def test_gradients_flow_and_match_reference():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 3, 4, 5, 1, 6, 7])
    pair_contrastive_loss(emb, tau, note_ids=ids).backward()
    got_emb, got_tau = emb.grad.clone(), tau.grad.clone()
    assert got_emb.abs().sum() > 0 and got_tau.abs() > 0
    emb.grad, tau.grad = None, None
    reference_loss(emb, tau, duplicate_columns(ids.tolist())).backward()
    assert torch.allclose(got_emb, emb.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_tau, tau.grad, rtol=1e-4, atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        pair_contrastive_loss(torch.randn(4), torch.tensor(3.0))
    with pytest.raises(ValueError):
        pair_contrastive_loss(torch.randn(4, 3), torch.tensor(3.0), note_ids=torch.arange(3))


def test_hard_negatives_are_extra_columns_for_every_row_with_empty_slots_and_duplicates_masked():
    g = torch.Generator().manual_seed(7)
    B, K, d = 3, 2, 8
    emb = torch.randn(2 * B, d, generator=g, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(B * K, d, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(2.0, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 10, 11, 12])
    # slot 1: empty; slot 2: row q_1's own note (id 1); slot 4: q_0's positive t_0 (id 10)
    neg_ids = torch.tensor([20, -1, 1, 21, 10, 22])
    got = pair_contrastive_loss(emb, tau, ids, negatives=neg, negative_ids=neg_ids)
    # rows whose own note or positive is a negative: q_1 / t_1 (id 1), q_0 / t_0 (id 10)
    dropped = {i: {1} | ({2} if i in (1, 4) else set()) | ({4} if i in (0, 3) else set()) for i in range(2 * B)}
    want = reference_loss(emb, tau, negatives=neg, neg_excluded=dropped)
    assert torch.allclose(got.double(), want, rtol=1e-6), (got.item(), want.item())  # the loss computes in fp32
    got.backward()
    g_got = (emb.grad.clone(), neg.grad.clone())
    emb.grad, neg.grad = None, None
    want.backward()
    assert torch.allclose(g_got[0], emb.grad, atol=1e-6) and torch.allclose(g_got[1], neg.grad, atol=1e-6)
    assert neg.grad[1].abs().max() == 0  # an empty slot takes no part
    # without ids only the empty slot is masked; more candidates make the loss larger
    plain = pair_contrastive_loss(emb, tau)
    no_ids = pair_contrastive_loss(emb, tau, negatives=neg, negative_ids=neg_ids)
    want_no_ids = reference_loss(emb, tau, negatives=neg, neg_excluded={i: {1} for i in range(2 * B)})
    assert torch.allclose(no_ids.double(), want_no_ids, rtol=1e-6) and no_ids > plain
    with pytest.raises(ValueError, match="negative_ids"):
        pair_contrastive_loss(emb, tau, ids, negatives=neg)


def test_matryoshka_loss_is_the_weighted_sum_over_prefixes_normalised_on_their_own():
    torch.manual_seed(5)
    emb = torch.randn(10, 12, dtype=torch.float64)
    tau = torch.tensor(2.5, dtype=torch.float64)
    ids = [0, 1, 2, 3, 4, 5, 0, 7, 8, 1]  # duplicates: the masks apply to every prefix
    dims, weights = [3, 6, 12], [0.5, 1.0, 2.0]
    # reference: the loop transcription on each prefix, which it normalises from the raw slice
    expected = sum(w * reference_loss(emb[:, :d], tau, duplicate_columns(ids)) for d, w in zip(dims, weights))
    got = matryoshka_loss(emb, tau, dims, weights, torch.tensor(ids), gather="none")
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    unweighted = sum(reference_loss(emb[:, :d], tau, duplicate_columns(ids)) for d in dims)
    assert math.isclose(matryoshka_loss(emb, tau, dims, note_ids=torch.tensor(ids)).item(), unweighted.item(),
                        rel_tol=1e-5)
    # a prefix is not the full embedding's leading coordinates after normalisation: the loss differs
    assert not math.isclose(matryoshka_loss(emb, tau, [3]).item(), pair_contrastive_loss(emb, tau).item(), rel_tol=1e-3)


def test_matryoshka_loss_rejects_bad_dims():
    emb, tau = torch.randn(4, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="exceed the embedding width 8"):
        matryoshka_loss(emb, tau, [4, 16])
    with pytest.raises(ValueError, match="2 matryoshka weights for 1 dims"):
        matryoshka_loss(emb, tau, [4], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        matryoshka_loss(emb, tau, [])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 9.0, 19.0])
def test_micl_loss_formula(alpha):
    lv, lm = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    out = micl_loss(lv, lm, alpha)
    assert out.item() == pytest.approx((2.0 + alpha * 0.5) / (1.0 + alpha))
    out.backward()
    assert lv.grad.item() == pytest.approx(1 / (1 + alpha)) and lm.grad.item() == pytest.approx(alpha / (1 + alpha))


# ---------------------------------------------------------------------------------------------
# Gathered over 2 gloo processes == single process on the concatenated batch
# ---------------------------------------------------------------------------------------------

WORLD, B_LOCAL, DIM = 2, 3, 8


def _global_batch():
    g = torch.Generator().manual_seed(42)
    q = torch.randn(WORLD * B_LOCAL, DIM, generator=g)
    t = torch.randn(WORLD * B_LOCAL, DIM, generator=g)
    # Note ids with a duplicate across ranks: rank 0's q_1 is rank 1's t_2.
    q_ids = torch.arange(WORLD * B_LOCAL)
    t_ids = torch.arange(100, 100 + WORLD * B_LOCAL)
    t_ids[B_LOCAL + 1] = q_ids[0]
    t[B_LOCAL + 1] = q[0]  # the same note embeds the same
    return q, t, q_ids, t_ids


def _local_block(x_q, x_t, rank):
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return torch.cat([x_q[sl], x_t[sl]])  # this rank's [q..., t...]


def _worker(rank: int, world: int, out_dir: str) -> None:
    q, t, q_ids, t_ids = _global_batch()
    results = {}
    for mode in ("no_grad", "with_grad"):
        for use_ids in (False, True):
            emb = _local_block(q, t, rank).clone().requires_grad_(True)
            tau = torch.tensor(3.0, requires_grad=True)
            ids = _local_block(q_ids, t_ids, rank) if use_ids else None
            loss = pair_contrastive_loss(emb, tau, note_ids=ids, gather=mode)
            loss.backward()
            results[(mode, use_ids)] = (loss.detach(), emb.grad.clone())
    neg, neg_ids = _negatives()
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    loss = pair_contrastive_loss(_local_block(q, t, rank), torch.tensor(3.0), note_ids=_local_block(q_ids, t_ids, rank),
                                 negatives=neg[sl], negative_ids=neg_ids[sl])
    results["negatives"] = loss
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _negatives():
    """One hard negative per pair; rank 1's first is rank 0's q_0 (a cross-rank duplicate of a row), its second empty."""
    neg = torch.randn(WORLD * B_LOCAL, DIM, generator=torch.Generator().manual_seed(43))
    neg_ids = torch.arange(200, 200 + WORLD * B_LOCAL)
    neg_ids[B_LOCAL], neg_ids[B_LOCAL + 1] = 0, -1
    return neg, neg_ids


@pytest.fixture(scope="module")
def gathered_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    run_on_gloo_ranks(_worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["no_grad", "with_grad"])
@pytest.mark.parametrize("use_ids", [False, True], ids=["no_ids", "note_ids"])
def test_gathered_loss_equals_single_process_loss(gathered_results, mode, use_ids):
    q, t, q_ids, t_ids = _global_batch()
    emb = torch.cat([q, t]).requires_grad_(True)  # the concatenated batch in the plain layout
    ids = torch.cat([q_ids, t_ids]) if use_ids else None
    single = pair_contrastive_loss(emb, torch.tensor(3.0), note_ids=ids, gather="none")
    single.backward()
    for rank in range(WORLD):
        loss, grad = gathered_results[rank][(mode, use_ids)]
        assert torch.allclose(loss, single.detach(), rtol=1e-5, atol=1e-6), (rank, loss.item(), single.item())
        # Gradient of this rank's rows: no_grad gives exactly the full-batch gradient (the local
        # rows are live in every term of this rank's loss); with_grad sums every rank's identical
        # loss through the collective, i.e. WORLD times it. Data-parallel averaging of parameter
        # gradients then yields 1/WORLD (no_grad, as in the official code) or 1x (with_grad) of
        # the full-batch gradient; Adam is insensitive to that constant factor.
        want = _local_block(emb.grad[: WORLD * B_LOCAL], emb.grad[WORLD * B_LOCAL:], rank)
        factor = 1.0 if mode == "no_grad" else float(WORLD)
        assert torch.allclose(grad, factor * want, rtol=1e-4, atol=1e-6), (mode, rank)
    if use_ids:
        # The cross-rank duplicate matters: ids change the value.
        plain = pair_contrastive_loss(torch.cat([q, t]), torch.tensor(3.0))
        assert not torch.allclose(single.detach(), plain)


def test_gathered_hard_negatives_equal_single_process(gathered_results):
    q, t, q_ids, t_ids = _global_batch()
    neg, neg_ids = _negatives()
    single = pair_contrastive_loss(torch.cat([q, t]), torch.tensor(3.0), note_ids=torch.cat([q_ids, t_ids]),
                                   gather="none", negatives=neg, negative_ids=neg_ids)
    for rank in range(WORLD):
        assert torch.allclose(gathered_results[rank]["negatives"], single, rtol=1e-5, atol=1e-6)
