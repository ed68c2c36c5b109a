"""Late fusion (REFERENCE §5): mix the vision CLS feature back into a note embedding with a gate.

    v = W_v cls                       (h_v -> h_t, bias-free)
    z = sigmoid(W [v ; n] + b)        (b only when gate_bias; the official code has none)
    n_hat = z * v + (1 - z) * n

Notes without an image pass through unchanged. NoteLLM2 applies the same module (same v, same
gate) to the visual and the multimodal embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class LateFusionGate(nn.Module):
    """Gated mix of a projected vision feature into the LLM's note embedding."""

    def __init__(self, vision_dim: int, llm_dim: int, gate_bias: bool = True):
        """
        Args:
            vision_dim: h_v, width of the vision CLS feature.
            llm_dim: h_t, width of the note embedding.
            gate_bias: give the gate a bias b (paper) or not (official code).
        """
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, llm_dim, bias=False)
        self.gate = nn.Linear(2 * llm_dim, llm_dim, bias=gate_bias)

    def project(self, cls: torch.Tensor) -> torch.Tensor:
        """cls [N, h_v] -> v [N, h_t]; computed once and shared by both embeddings."""
        return self.vision_proj(cls)

    def forward(self, note: torch.Tensor, vision: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse.

        Args:
            note: n [N, h_t], the LLM's note embedding.
            vision: v [N, h_t], from `project`.
            has_image: bool [N]; False rows return `note` unchanged. None means all True.

        Returns:
            n_hat [N, h_t].
        """
        z = torch.sigmoid(self.gate(torch.cat([vision, note], dim=-1)))  # [N, h_t]
        fused = z * vision + (1 - z) * note
        if has_image is None:
            return fused
        return torch.where(has_image.view(-1, 1), fused, note)
