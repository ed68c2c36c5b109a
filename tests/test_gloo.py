"""The gloo-rank harness ends ranks with os._exit(0): a rank that fails must still fail the test."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessRaisedException

from tests.gloo import run_on_gloo_ranks


def _sum_ranks(rank: int, world: int, out_dir: str) -> None:
    import torch

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(str(t.item()))


def _rank_one_fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 found a wrong gradient")


def test_ranks_share_one_group_and_their_files_are_judged(tmp_path):
    run_on_gloo_ranks(_sum_ranks, 2, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["3.0", "3.0"]


def test_an_exception_on_one_rank_fails_the_run_with_its_message():
    with pytest.raises(ProcessRaisedException, match="rank 1 found a wrong gradient"):
        run_on_gloo_ranks(_rank_one_fails, 2)
