"""Process-group helpers that are the identity without a process group.

CPU unit tests and multi-worker runs share one code path: with no initialised process group
`gather_embeddings` returns its input and offset 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_embeddings(x: torch.Tensor, mode: str = "no_grad") -> tuple[torch.Tensor, int]:
    """Concatenate `x` [n, d] from every rank along dim 0.

    Args:
        x: this rank's rows; every rank must pass the same shape.
        mode: `none` (no gather), `no_grad` (official: gathered copies carry no gradient, this
            rank's slice is put back so its rows keep theirs) or `with_grad` (gradients flow to
            every rank's rows through the collective).

    Returns:
        (gathered [world * n, d], row offset of this rank's slice).
    """
    rank, world = world_info()
    if mode == "none" or world == 1:
        return x, 0
    if mode == "with_grad":
        import torch.distributed.nn.functional as dist_fn  # autograd-aware collectives

        return torch.cat(dist_fn.all_gather(x), dim=0), rank * x.shape[0]
    if mode != "no_grad":
        raise ValueError(f"gather mode {mode!r}: allowed none, no_grad, with_grad")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # local rows keep their autograd history
    return torch.cat(parts, dim=0), rank * x.shape[0]
