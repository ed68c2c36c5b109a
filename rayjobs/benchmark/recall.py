"""Suite `recall`: exact chunked Recall@K ranks (`core.metrics.target_ranks`) against a
full-argsort implementation: time and peak RSS, each case in a fresh process."""

from __future__ import annotations

import numpy as np

from rayjobs.benchmark.harness import TARGETS, Context, figure, in_fresh_process, log, spread
from rayjobs.benchmark.spawned import recall_job


def run(ctx: Context) -> dict:
    figures, absolute, cases = {}, {}, []
    reps = ctx.p["recall_repeats"]
    for n_cand, dim, n_query in ctx.p["recall"]:
        tag = f"{n_cand // 1000}k_{dim}d"
        log(f"recall: {n_cand:,} candidates x {dim}-d, {n_query} queries")
        res = in_fresh_process(recall_job, n_cand, dim, n_query, reps)
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
