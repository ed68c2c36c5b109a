"""GradCache (Gao et al., 2021): contrastive batches larger than activation memory, same gradient.

An in-batch contrastive loss couples every row of the batch, so it cannot be split into
independent micro-batches. It *can* be split at the embeddings: the loss is a function of the
[M, d] embedding matrix only, and the parameters reach the loss through it. So a step is

1. `embed_without_graph`: embed the batch chunk by chunk under `torch.no_grad` (activation
   memory of one chunk), recording each chunk's RNG state before its forward;
2. the caller computes the full-batch loss on the concatenated embeddings (detached leaves,
   cross-worker gather included) and its gradient with respect to them (`loss_and_grads`);
3. `replay_with_graph`: for each chunk, restore its RNG state (dropout draws the same masks as
   in pass 1, so the replayed embeddings equal the cached ones), embed it again *with* graph and
   back-propagate the surrogate <embeddings_chunk, cached gradient_chunk>, whose gradient with
   respect to the parameters is exactly the chunk's share of d loss / d parameters.

Gradients accumulate over the chunks, so after the replay they equal the un-chunked step's (up
to float summation order). Nothing here knows the batch layout: chunks are row-index tensors
chosen by `core.step`, `embed(rows)` is the caller's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def capture_rng(device: torch.device | str) -> tuple:
    """The RNG state a forward on `device` draws from (CPU generator, plus CUDA's on a GPU)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple, device: torch.device | str) -> None:
    """Put back a state from `capture_rng`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, torch.device(device))


def embed_without_graph(embed: Callable[[torch.Tensor], tuple], chunks: Sequence[torch.Tensor],
                        device: torch.device | str) -> tuple[list[tuple], list[tuple]]:
    """Pass 1: `embed(rows)` for each chunk under no_grad.

    Args:
        embed: rows -> tuple of tensors (e.g. (multimodal [n, d], visual [n, d] or None, tau)).
        chunks: long index tensors; together they cover the batch.
        device: where the forward draws random numbers.

    Returns:
        (outputs, rng_states): each chunk's detached outputs (cloned: under ZeRO-3 a returned
        parameter view is freed after the forward) and the RNG state its forward started from.
    """
    outputs, states = [], []
    with torch.no_grad():
        for rows in chunks:
            states.append(capture_rng(device))
            outputs.append(tuple(None if t is None else t.detach().clone() for t in embed(rows)))
    return outputs, states


def scatter_rows(parts: Sequence[torch.Tensor | None], chunks: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor | None:
    """Chunk outputs [n_i, d] back into one [n_rows, d] matrix in batch order (None stays None)."""
    if parts[0] is None:
        return None
    full = parts[0].new_empty((n_rows, *parts[0].shape[1:]))
    for rows, part in zip(chunks, parts):
        full[rows.to(full.device)] = part
    return full


def loss_and_grads(loss_fn: Callable[..., tuple], inputs: Sequence[torch.Tensor | None]) -> tuple:
    """Loss on detached leaf copies of `inputs` and its gradient with respect to each of them.

    Args:
        loss_fn: (*leaves) -> (loss, extra); called with gradients enabled.
        inputs: full-batch tensors (None passes through with a None gradient).

    Returns:
        (loss detached, extra, [d loss / d input or None]).
    """
    leaves = [None if t is None else t.detach().float().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        loss, extra = loss_fn(*leaves)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    out = [None if t is None else next(grads) for t in leaves]
    return loss.detach(), extra, [None if t is None or g is None else g.detach() for t, g in zip(leaves, out)]


def replay_with_graph(embed: Callable[[torch.Tensor], tuple], chunks: Sequence[torch.Tensor], states: Sequence[tuple],
                      surrogate: Callable[[int, torch.Tensor, tuple], torch.Tensor], device: torch.device | str,
                      run_backward: Callable[[torch.Tensor], object] | None = None,
                      set_boundary: Callable[[bool], object] | None = None) -> None:
    """Pass 3: re-embed each chunk with graph under its pass-1 RNG state and back-propagate.

    Args:
        embed: as in `embed_without_graph`.
        chunks, states: as returned / used by `embed_without_graph`.
        surrogate: (chunk index, rows, outputs with graph) -> scalar whose gradient with respect
            to the outputs is the cached loss gradient of those rows.
        device: as in `embed_without_graph`.
        run_backward: how to back-propagate a scalar (DeepSpeed: `engine.backward`); default
            `tensor.backward()`.
        set_boundary: called with True before the last chunk's backward and False before the
            others (DeepSpeed: `engine.set_gradient_accumulation_boundary`, so gradients are
            reduced across workers once, after the last chunk).
    """
    run_backward = run_backward or (lambda t: t.backward())
    after = capture_rng(device)  # the stream continues from where pass 1 left it
    try:
        for i, (rows, state) in enumerate(zip(chunks, states)):
            restore_rng(state, device)
            loss = surrogate(i, rows, embed(rows))
            if set_boundary is not None:
                set_boundary(i == len(chunks) - 1)
            run_backward(loss)
    finally:
        restore_rng(after, device)
