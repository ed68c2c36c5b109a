"""What the suites run in spawned processes (`ProcessPoolExecutor` with the spawn context): the
plain-loop embedding and the recall timing. A spawned child imports this module to unpickle its
function, so it imports only torch and `core` (not Ray): the child's start-up is the baseline's,
not the driver's."""

from __future__ import annotations

import threading
import time

import psutil
import torch

from core.config import RunConfig
from core.data.pipeline import NotePreprocessor
from core.embedding import embed_batch
from core.evaluation import read_notes
from core.metrics import target_ranks
from core.model.builders import build_model


def embed_plain_job(run_dict: dict, data_dir: str, note_ids: list, batch_size: int) -> dict:
    """One plain-loop embedding process (1 torch thread): model build, then preprocess + embed."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(run_dict, "benchmark")
    t0 = time.time()
    model, _ = build_model(cfg.model, cfg.loss, seed=cfg.train.seed)
    model.eval()
    prep = NotePreprocessor(cfg.model)
    notes = read_notes(data_dir, note_ids=note_ids)
    t1 = time.time()
    with torch.no_grad():
        for i in range(0, notes.num_rows, batch_size):
            embed_batch(model, prep(notes.slice(i, batch_size)), "cpu")
    return {"build_s": t1 - t0, "embed_s": time.time() - t1, "notes": notes.num_rows}


def _rss() -> int:
    return psutil.Process().memory_info().rss


def argsort_ranks(query: torch.Tensor, cand: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain baseline: full score matrix, full descending argsort, target's position."""
    scores = query @ cand.T  # [Q, C]
    order = scores.argsort(dim=1, descending=True)  # [Q, C]
    return (order == target[:, None]).nonzero()[:, 1]  # position of the target: candidates sorted above it


def recall_job(n_cand: int, dim: int, n_query: int, repeats: int, seed: int = 0) -> dict:
    """Runs in a fresh process: times each method and samples RSS above the inputs' footprint.

    Methods run one after the other; their large buffers are freed (returned to the OS) in
    between, so each method's peak is measured against the RSS just before it starts.
    """
    g = torch.Generator().manual_seed(seed)
    cand = torch.randn(n_cand, dim, generator=g)  # float32 [C, d]
    query = torch.randn(n_query, dim, generator=g)
    target = torch.randint(0, n_cand, (n_query,), generator=g)
    methods = {"chunked": lambda: target_ranks(query, cand, target),  # the default: float32 GEMM + float64 recheck
               "argsort": lambda: argsort_ranks(query, cand, target)}
    out = {}
    for name, fn in methods.items():
        base = _rss()
        peak, stop = [base], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ranks = fn()
            times.append(time.perf_counter() - t0)
        stop.set()
        thread.join()
        out[name] = {"seconds": times, "peak_extra_mb": (peak[0] - base) / 2**20, "ranks": ranks.tolist()}
        del ranks
    return out
