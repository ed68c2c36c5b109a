"""Suite `embed`: notes/s of the Ray Data actor-pool embedding (`rayjobs.evaluate.embed_with_ray`)
against a plain loop at equal parallelism (1 and 2 actors / processes)."""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from core.config import RunConfig
from core.evaluation import read_notes
from rayjobs.benchmark.harness import TARGETS, Context, StepRecorder, figure, log, spread
from rayjobs.benchmark.spawned import embed_plain_job
from rayjobs.evaluate import embed_with_ray
from rayjobs.train import ensure_ray


def _plain_embed(cfg: RunConfig, note_ids: np.ndarray, procs: int, batch_size: int) -> tuple[float, float]:
    """(steady notes/s, start-up s) of `procs` plain processes, each embedding its share."""
    shares = np.array_split(note_ids, procs)
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(embed_plain_job, [cfg.to_dict()] * procs, [cfg.data.path] * procs,
                                [s.tolist() for s in shares], [batch_size] * procs))
    return len(note_ids) / max(r["embed_s"] for r in results), max(r["build_s"] for r in results)


def _timed_embed_with_ray(cfg: RunConfig, ids: np.ndarray, actors: int, batch_size: int) -> tuple[float, float]:
    """(steady notes/s, start-up s) of `rayjobs.evaluate.embed_with_ray`, its output iterator timed.

    Steady state starts once `actors` batches have arrived (every actor has loaded its model).
    """
    rec, sizes = StepRecorder(), []

    def timed(batches):
        for batch in rec.wrap(batches):
            sizes.append(len(batch[0]))  # (note ids, embeddings)
            yield batch

    start = time.time()
    embed_with_ray(cfg.data.path, cfg, ids, untrained=cfg.to_dict(), actors=actors, batch_size=batch_size, progress=False,
                   wrap_batches=timed)
    skip = min(actors, len(sizes) - 1)
    t0 = rec.arrivals[skip - 1] if skip else start
    rate = sum(sizes[skip:]) / max(rec.arrivals[-1] - t0, 1e-9)
    return rate, t0 - start


def run(ctx: Context) -> dict:
    ensure_ray()
    cfg = ctx.run_cfg(1, "bench-embed")
    ids = np.sort(read_notes(cfg.data.path, columns=["note_id"])["note_id"].to_numpy())
    bs = ctx.p["embed_batch"]
    ray_rates, ray_startup, plain_rates, plain_startup = {}, {}, {}, {}
    for actors in (1, 2):
        rates, startups = [], []
        for rep in range(ctx.p["embed_repeats"]):
            log(f"embed: Ray Data actor pool, {actors} actor(s), repeat {rep + 1}")
            rate, startup = _timed_embed_with_ray(cfg, ids, actors, bs)
            rates.append(rate)
            startups.append(startup)
        ray_rates[actors], ray_startup[actors] = rates, startups
        log(f"embed: plain loop, {actors} process(es)")
        runs = [_plain_embed(cfg, ids, actors, bs) for _ in range(ctx.p["embed_repeats"])]
        plain_rates[actors], plain_startup[actors] = [r[0] for r in runs], [r[1] for r in runs]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {
        "figures": {
            "ray_1a_over_plain": figure(med(ray_rates[1]) / med(plain_rates[1]), TARGETS["embed_vs_plain"], True,
                                        "steady notes/s, Ray 1 embedding actor / 1 plain process"),
            "ray_2a_over_plain": figure(med(ray_rates[2]) / med(plain_rates[2]), TARGETS["embed_vs_plain"], True,
                                        "steady notes/s, Ray 2 embedding actors / 2 plain processes"),
            "scaling_2a_over_1a": figure(med(ray_rates[2]) / med(ray_rates[1]), None, True, "Ray notes/s, 2 actors / 1 actor"),
        },
        "absolute": {
            **{f"ray_{a}a_notes_per_s": spread(ray_rates[a], "notes/s") for a in (1, 2)},
            **{f"plain_{a}p_notes_per_s": spread(plain_rates[a], "notes/s") for a in (1, 2)},
            **{f"ray_{a}a_startup_s": spread(ray_startup[a], "s") for a in (1, 2)},
            **{f"plain_{a}p_startup_s": spread(plain_startup[a], "s") for a in (1, 2)},
        },
        "config": {"notes": int(len(ids)), "batch_size": bs, "threads_per_actor": 1, "preprocess_actors": cfg.data.preprocess_actors,
                   "method": "Ray: notes arriving after the first `actors` batches / their arrival span (the real embed_with_ray, "
                             "its iter_batches timed); plain: N / embed time after model build (max over processes)"},
    }
