"""Suite `train`: notes/s of the real Ray Train + Ray Data + DeepSpeed run (1 and 2 workers) against
a plain PyTorch loop over the same model, data and batch. The timed Ray runs are cached in the
context: the `input` suite reads their data-wait figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
import ray.train
import torch

from core.data.pipeline import iter_pair_batches_local
from core.model.builders import build_model
from core.step import forward_pair_batch
from rayjobs.benchmark.harness import TARGETS, Context, StepRecorder, figure, log, spread, steady_state
from rayjobs.train import build_trainer, ensure_ray
from rayjobs.train_worker import train_fn_per_worker

TIMINGS_DIR = "bench_timings"


def timed_train_fn(config: dict) -> None:
    """The real `train_fn_per_worker`, with the Ray Data shard's batch iterator timed.

    Each rank writes `<storage>/<name>/bench_timings/rank<r>.json`: batch arrival times, time
    blocked in next(), loop end and torch's thread count in the worker.
    """
    rec = StepRecorder()
    try:
        train_fn_per_worker(config, wrap_batches=rec.wrap)
    finally:
        t = config["run"]["train"]
        out = Path(t["storage_path"]) / t["name"] / TIMINGS_DIR
        out.mkdir(parents=True, exist_ok=True)
        rank = ray.train.get_context().get_world_rank()
        (out / f"rank{rank}.json").write_text(json.dumps({**rec.to_dict(), "threads": torch.get_num_threads()}))


def run_ray_training(ctx: Context, workers: int) -> dict:
    """One real TorchTrainer fit (build_trainer), timed per rank; cached per worker count."""
    if workers in ctx.runs:
        return ctx.runs[workers]
    ensure_ray()
    cfg = ctx.run_cfg(workers, "bench-ray")
    log(f"train: Ray Train + Ray Data + DeepSpeed, {workers} worker(s), {cfg.train.max_steps} steps")
    start = time.time()
    result = build_trainer(cfg, train_fn=timed_train_fn).fit()
    wall = time.time() - start
    if result.error:
        raise result.error
    tdir = Path(cfg.train.storage_path) / cfg.train.name / TIMINGS_DIR
    timings = {int(p.stem[4:]): json.loads(p.read_text()) for p in tdir.glob("rank*.json")}
    notes_per_step = 2 * cfg.train.batch_size * workers
    out = {"rank0": steady_state(timings[0], ctx.p["warmup_steps"], notes_per_step, start), "wall_seconds": wall,
           "wait_fraction_by_rank": {r: steady_state(t, ctx.p["warmup_steps"], notes_per_step, start)["wait_fraction"]
                                     for r, t in sorted(timings.items())}}
    ctx.runs[workers] = out
    return out


def run_plain_loop(ctx: Context, threads: int) -> dict:
    """build_model + torch AdamW + iter_pair_batches_local + forward_pair_batch, in this process."""
    if "plain" in ctx.runs:
        return ctx.runs["plain"]
    cfg = ctx.run_cfg(1, "bench-plain")
    t = cfg.train
    log(f"train: plain PyTorch loop, {threads} thread(s), {t.max_steps} steps")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.time()
        torch.manual_seed(t.seed)
        model, _ = build_model(cfg.model, cfg.loss, seed=t.seed)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
        rec, step = StepRecorder(), 0
        for batch in rec.wrap(iter_pair_batches_local(cfg.data.path, "train", cfg, batch_size=t.batch_size, seed=t.seed)):
            loss, _ = forward_pair_batch(model, batch, cfg.loss, "cpu")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step >= t.max_steps:
                break
    finally:
        torch.set_num_threads(old_threads)
    out = {"rank0": steady_state({**rec.to_dict(), "threads": threads}, ctx.p["warmup_steps"], 2 * t.batch_size, start)}
    ctx.runs["plain"] = out
    return out


@ray.remote(num_cpus=1)
class _ThreadProbe:
    def threads(self) -> int:
        return torch.get_num_threads()


def ray_worker_threads() -> int:
    """torch threads a 1-CPU Ray actor gets (Ray sets OMP_NUM_THREADS from the CPU request)."""
    ensure_ray()
    actor = _ThreadProbe.remote()
    try:
        return int(ray.get(actor.threads.remote()))
    finally:
        ray.kill(actor)


def run(ctx: Context) -> dict:
    threads = ray_worker_threads()
    plain = run_plain_loop(ctx, threads)["rank0"]
    one = run_ray_training(ctx, 1)
    two = run_ray_training(ctx, 2)
    r1, r2 = one["rank0"], two["rank0"]
    ratio = r1["notes_per_s"]["median"] / plain["notes_per_s"]["median"]
    return {
        "figures": {
            "ray_1w_over_plain": figure(ratio, TARGETS["train_vs_plain"], True, "steady notes/s, Ray pipeline (1 worker) / plain loop"),
            "scaling_2w_over_1w": figure(r2["notes_per_s"]["median"] / r1["notes_per_s"]["median"], None, True,
                                         "steady notes/s, 2 workers / 1 worker (ideal 2.0 on 2 free cores)"),
            "startup_ray_over_plain": figure(r1["startup_seconds"] / plain["startup_seconds"], None, False,
                                             "seconds to the first finished step, Ray 1 worker / plain loop"),
        },
        "absolute": {
            "plain_notes_per_s": plain["notes_per_s"], "ray_1w_notes_per_s": r1["notes_per_s"],
            "ray_2w_notes_per_s": r2["notes_per_s"], "plain_step_s": plain["step_seconds"],
            "ray_1w_step_s": r1["step_seconds"], "ray_2w_step_s": r2["step_seconds"],
            "plain_startup_s": spread([plain["startup_seconds"]], "s"), "ray_1w_startup_s": spread([r1["startup_seconds"]], "s"),
            "ray_2w_startup_s": spread([r2["startup_seconds"]], "s"),
        },
        "config": {"model": ctx.p["model"], "batch_size_per_worker": ctx.p["batch_size"], "warmup_steps": ctx.p["warmup_steps"],
                   "measured_steps": r1["steps_measured"], "torch_threads_per_worker": threads, "deepspeed": "zero2",
                   "repeats": "min/median/max over 3 equal blocks of the steady-state steps"},
    }
