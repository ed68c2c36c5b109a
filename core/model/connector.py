"""Connectors C_pi (REFERENCE §3): vision patch features -> L visual tokens in the LLM's space.

    tokens = connector(patches)   # [N, L_p, h_v] -> [N, L, h_t]

- `QFormerConnector` (paper): L learnable queries refined by pre-norm blocks of
  [self-attention over the queries, cross-attention to the patches, FFN], then an MLP to h_t.
- `MLPConnector`: adaptive average pooling of the patch tokens to L, then the same MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in -> h_t), GELU, Linear(h_t -> h_t): the paper's projector into the LLM space."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class QFormerBlock(nn.Module):
    """One pre-norm block: queries self-attend, cross-attend to the patches, then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int = 4):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """queries [N, L, h_q], patches [N, L_p, h_q] -> [N, L, h_q]."""
        q = self.norm_self(queries)
        queries = queries + self.self_attn(q, q, q, need_weights=False)[0]
        q, kv = self.norm_cross(queries), self.norm_kv(patches)
        queries = queries + self.cross_attn(q, kv, kv, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class QFormerConnector(nn.Module):
    """Randomly initialised Q-Former + MLP (paper): L learnable queries read the patch features."""

    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int, num_layers: int = 6, num_heads: int = 8, dim: int = 0):
        """
        Args:
            vision_dim: h_v, width of the patch features.
            llm_dim: h_t, width of the LLM's token embeddings.
            num_tokens: L, visual tokens per image.
            num_layers: Q-Former blocks.
            num_heads: attention heads; must divide the Q-Former width.
            dim: Q-Former width h_q; 0 uses h_v (then the patches need no input projection).
        """
        super().__init__()
        dim = dim or vision_dim
        if dim % num_heads:
            raise ValueError(f"Q-Former width {dim} is not divisible by {num_heads} heads")
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.input_proj = nn.Identity() if dim == vision_dim else nn.Linear(vision_dim, dim)
        self.blocks = nn.ModuleList(QFormerBlock(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.mlp = projection_mlp(dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, L_p, h_v] -> visual tokens [N, L, h_t]."""
        patches = self.input_proj(patches)  # [N, L_p, h_q]
        queries = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)  # [N, L, h_q]
        for block in self.blocks:
            queries = block(queries, patches)
        return self.mlp(self.norm(queries))  # [N, L, h_t]


class MLPConnector(nn.Module):
    """Pool the patch tokens to L (adaptive average over token order), then the MLP."""

    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = projection_mlp(vision_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, L_p, h_v] -> visual tokens [N, L, h_t]."""
        pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.num_tokens)  # [N, h_v, L]
        return self.mlp(pooled.transpose(1, 2))  # [N, L, h_t]
