"""Suite `recall`: exact chunked Recall@K ranks (`core.metrics.target_ranks`) against a
full-argsort implementation: time and peak RSS, each case in a fresh process."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import torch

from core.metrics import target_ranks
from rayjobs.benchmark.harness import TARGETS, Context, figure, in_fresh_process, log, spread


def _rss() -> int:
    return psutil.Process().memory_info().rss


def argsort_ranks(query: torch.Tensor, cand: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain baseline: full score matrix, full descending argsort, target's position."""
    scores = query @ cand.T  # [Q, C]
    order = scores.argsort(dim=1, descending=True)  # [Q, C]
    return (order == target[:, None]).nonzero()[:, 1]  # position of the target: candidates sorted above it


def _recall_job(n_cand: int, dim: int, n_query: int, repeats: int, seed: int = 0) -> dict:
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


def run(ctx: Context) -> dict:
    figures, absolute, cases = {}, {}, []
    reps = ctx.p["recall_repeats"]
    for n_cand, dim, n_query in ctx.p["recall"]:
        tag = f"{n_cand // 1000}k_{dim}d"
        log(f"recall: {n_cand:,} candidates x {dim}-d, {n_query} queries")
        res = in_fresh_process(_recall_job, n_cand, dim, n_query, reps)
        # The baseline ranks by a float32 score matrix (ties and one-ulp errors broken by sort position); the
        # chunked path's ranks are exact (float64 comparisons). They may differ only for such near-ties.
        diff = np.abs(np.asarray(res["chunked"]["ranks"]) - np.asarray(res["argsort"]["ranks"]))
        base_t = float(np.median(res["argsort"]["seconds"]))
        figures[f"speedup_{tag}"] = figure(base_t / float(np.median(res["chunked"]["seconds"])), TARGETS["recall_speedup"], True,
                                           f"argsort time / chunked time (`target_ranks` default: float32 GEMM, float64 "
                                           f"recheck of near-ties), {n_query} queries")
        figures[f"memory_ratio_{tag}"] = figure(res["chunked"]["peak_extra_mb"] / max(res["argsort"]["peak_extra_mb"], 1e-3), None, False,
                                                "peak extra RSS, chunked / argsort")
        for m, r in res.items():
            absolute[f"{m}_{tag}_s"] = spread(r["seconds"], "s")
            absolute[f"{m}_{tag}_peak_extra_mb"] = spread([r["peak_extra_mb"]], "MB")
        cases.append({"candidates": n_cand, "dim": dim, "queries": n_query,
                      "queries_with_different_rank_than_argsort": int((diff > 0).sum()), "max_rank_difference": int(diff.max())})
    return {"figures": figures, "absolute": absolute,
            "config": {"cases": cases, "chunk_size": 8192, "query_chunk_size": 2048,
                       "note": "both methods score the same query subsample (the argsort baseline holds a [Q, C] "
                               "score matrix plus int64 indices); peak memory = sampled RSS above the inputs, fresh process"}}
