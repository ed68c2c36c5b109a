"""One home for the tests that run code on real gloo ranks: spawn `world` processes, join them in
one process group, run a function on each and judge what the ranks wrote to disk.

Why the exit is special: a spawned rank that has finished, saved its results and destroyed its
process group can still die with SIGABRT ("terminate called without an active exception") while
the interpreter tears down. Gloo's C++ threads can outlive `destroy_process_group` through objects
that autograd or a collective's Work still holds. That abort happens after the rank's work is
done, so it says nothing about the code under test, but `mp.spawn` reports it as a failed
process: CI failed 4 tests this way, once in roughly ten full runs. So every rank waits at a
barrier (no collective is still in flight when a peer leaves), destroys the group, flushes its
output and leaves with `os._exit(0)`, which skips that teardown. An exception raised by the
function still reaches `mp.spawn` with its traceback, as before.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def run_on_gloo_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run `fn(rank, world, *args)` on `world` spawned processes joined by one gloo group.

    `fn` must be importable (a module-level function) and report through files: its return
    value is dropped. The ranks see MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK as a
    launcher sets them, so DeepSpeed finds the group already initialised.
    """
    mp.spawn(_rank_main, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # `world` ranks share this machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fn(rank, world, *args)  # raises through mp.spawn, traceback included
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
