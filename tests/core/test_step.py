"""The wiring of `core.step.compute_loss` (REFERENCE §4): which embedding feeds L^v and L^m, and
which side α multiplies, pinned against an independent InfoNCE on random tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.config import LossConfig
from core.model.notellm2 import NoteEmbeddings
from core.step import compute_loss


def reference_infonce(emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE over [q_1..q_B, t_1..t_B]: each row's positive is its pair, every other
    row a negative, the row itself excluded."""
    n = emb.shape[0]
    e = F.normalize(emb.double(), dim=-1)
    logits = (e @ e.T) * torch.exp(torch.tensor(tau, dtype=torch.float64))
    logits.fill_diagonal_(float("-inf"))
    positives = (torch.arange(n) + n // 2) % n
    return F.cross_entropy(logits, positives)


def _embeddings(seed: int = 0, b: int = 6, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    aligned = torch.cat([q, q + 0.05 * torch.randn(b, d, generator=g)])  # pairs nearly equal: low loss
    unrelated = torch.randn(2 * b, d, generator=g)  # pairs unrelated: high loss
    return aligned, unrelated


@pytest.mark.parametrize("alpha", [1.0, 9.0])
def test_micl_loss_mixes_visual_and_multimodal_with_alpha_on_the_multimodal_side(alpha):
    visual, multimodal = _embeddings()
    tau = 2.0
    cfg = LossConfig(alpha=alpha, gather="none", mask_duplicates=False)
    loss, metrics = compute_loss(NoteEmbeddings(multimodal, visual, torch.tensor(tau)), torch.tensor(tau), None, cfg)
    l_v, l_m = reference_infonce(visual, tau), reference_infonce(multimodal, tau)
    assert abs(l_v - l_m) > 1.0  # the two losses are far apart, so any swap shows
    assert float(metrics["loss_v"]) == pytest.approx(float(l_v), rel=1e-5)
    assert float(metrics["loss_m"]) == pytest.approx(float(l_m), rel=1e-5)
    assert float(loss) == pytest.approx(float((l_v + alpha * l_m) / (1 + alpha)), rel=1e-5)
    if alpha != 1.0:  # α on the visual side would give another value
        assert float(loss) != pytest.approx(float((alpha * l_v + l_m) / (1 + alpha)), rel=1e-3)


def test_without_a_visual_slot_the_loss_is_the_multimodal_one():
    _, multimodal = _embeddings(seed=1)
    cfg = LossConfig(gather="none", mask_duplicates=False)
    loss, metrics = compute_loss(NoteEmbeddings(multimodal, None, torch.tensor(1.5)), torch.tensor(1.5), None, cfg)
    assert "loss_v" not in metrics
    assert float(loss) == pytest.approx(float(reference_infonce(multimodal, 1.5)), rel=1e-5)


def test_the_log_scale_is_clamped_to_max_log_scale():
    _, multimodal = _embeddings(seed=2)
    cfg = LossConfig(gather="none", mask_duplicates=False, max_log_scale=2.0, temperature_init=1.0)
    loss, metrics = compute_loss(NoteEmbeddings(multimodal, None, torch.tensor(5.0)), torch.tensor(5.0), None, cfg)
    assert float(loss) == pytest.approx(float(reference_infonce(multimodal, 2.0)), rel=1e-5)
    assert float(metrics["temperature"]) == pytest.approx(float(torch.exp(torch.tensor(-2.0))), rel=1e-6)
