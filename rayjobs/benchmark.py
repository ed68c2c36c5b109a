"""Performance suite: every figure is a ratio against a baseline measured in the same run.

Local (starts an embedded Ray when RAY_ADDRESS is unset):

    python -m rayjobs.benchmark --size toy --out runs/bench-toy                 # every suite, seconds-to-minutes (CI)
    python -m rayjobs.benchmark --size full --out runs/bench --write-md BENCHMARKS.md   # < 20 min on 2 cores
    python -m rayjobs.benchmark --suite recall --suite mining --out runs/bench  # a subset

On a cluster (the head node runs the driver; `train` and `embed` use the cluster's workers):

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- \\
        python -m rayjobs.benchmark --size full --out /mnt/shared/bench

Suites (`--suite`, repeatable; default all):
    train    notes/s of Ray Train + Ray Data + DeepSpeed (1 worker) / a plain PyTorch loop over the
             same model, data and batch; 2 workers / 1 worker; start-up reported separately.
    input    Ray Data pipeline supply (images decoded + prompts tokenised /s) / trainer demand, and
             the fraction of steady step time the trainer waits inside the data iterator's next().
    embed    notes/s of the Ray Data actor-pool embedding / a plain loop at equal parallelism; 2 / 1 actors.
    recall   exact chunked Recall@K (core.metrics) / a full-argsort implementation: time and peak RSS.
    mining   events/s of core.data.pairs.mine_pairs / a straightforward pandas group-by implementation.
    gpu_mfu  model FLOPs utilisation of a bf16 ZeRO-2 step (SmolLM2 default, a 1B-class random Llama);
             skipped, with the reason recorded, when no CUDA GPU is visible.

Writes <out>/benchmarks.json and <out>/benchmarks.md; `--write-md PATH` also writes PATH.
Absolute figures carry min/median/max over repeats (or over equal blocks of steady-state steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SUITES = ("train", "input", "embed", "recall", "mining", "gpu_mfu")

# One model for train/input/embed: step time must dominate Ray's per-step cost, yet a 30-step run
# stays well under a minute on one CPU core. SmolLM2-135M cut to 4 decoder layers (LoRA) + the
# frozen MobileNetV2 at 128 px; a 2-layer Q-Former at width 256.
BENCH_MODEL = dict(llm="smollm2-135m", llm_num_layers=4, vision="mobilenet_v2", image_size=128, connector="qformer",
                   num_visual_tokens=8, qformer_layers=2, qformer_dim=256, qformer_heads=8, max_text_tokens=64,
                   content_max_chars=120, lora=True, lora_rank=8, lora_alpha=16, output_dim=64)
TOY_MODEL = dict(llm="tiny-llama", vision="tiny-cnn", image_size=32, connector="qformer", num_visual_tokens=4,
                 qformer_layers=1, qformer_heads=2, prompt_mode="micl", late_fusion=True, output_dim=16,
                 lora=True, lora_rank=4, lora_alpha=8, max_text_tokens=48, content_max_chars=40)

SIZES = {
    "toy": dict(model=TOY_MODEL, num_notes=160, batch_size=8, warmup_steps=2, steps=8, pipeline_repeats=1,
                embed_batch=16, embed_repeats=1, recall=[(20_000, 64, 64)],
                recall_repeats=1, mining=[(100_000, 1)]),
    "full": dict(model=BENCH_MODEL, num_notes=240, batch_size=8, warmup_steps=5, steps=29, pipeline_repeats=2,
                 embed_batch=16, embed_repeats=2,
                 recall=[(100_000, 64, 256), (100_000, 576, 256), (1_000_000, 64, 32), (1_000_000, 576, 32)],
                 recall_repeats=3, mining=[(1_000_000, 3), (10_000_000, 1)]),
}
TARGETS = {"train_vs_plain": 0.85, "data_wait_fraction": 0.05, "embed_vs_plain": 0.9, "recall_speedup": 5.0,
           "mining_speedup": 3.0}
# Dense bf16 tensor-core peak (no sparsity) by device-name substring, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spread(values, unit: str) -> dict:
    """min/median/max over repeats."""
    v = [float(x) for x in values]
    return {"min": min(v), "median": float(np.median(v)), "max": max(v), "n": len(v), "unit": unit}


def figure(value: float, target: float | None, higher_is_better: bool, what: str) -> dict:
    met = None if target is None else (value >= target if higher_is_better else value < target)
    return {"value": float(value), "target": target, "target_op": ">=" if higher_is_better else "<", "met": met, "what": what}


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        ram_gb = float("nan")
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "n/a"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram_gb, 1), "torch": torch.__version__, "ray": ray_version,
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_avg_start": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------
# Shared state: prepared data, run configs, cached training runs (train and input share them)
# ---------------------------------------------------------------------------------------------


class Context:
    """What the suites of one invocation share: sizes, output dir, data dir, cached runs."""

    def __init__(self, size: str, out: Path):
        self.size, self.p, self.out = size, SIZES[size], out
        self.data_dir = out / "data"
        self.runs: dict = {}

    def ensure_data(self) -> str:
        if not (self.data_dir / "pairs_train.parquet").exists():
            from rayjobs.prepare_data import prepare

            log(f"preparing synthetic corpus ({self.p['num_notes']} notes) in {self.data_dir}")
            prepare("synthetic", str(self.data_dir), num_notes=self.p["num_notes"], seed=0)
        return str(self.data_dir.resolve())

    def run_cfg(self, workers: int = 1, name: str = "bench"):
        from core.config import RunConfig

        steps = self.p["warmup_steps"] + self.p["steps"]
        return RunConfig.from_dict({
            "model": self.p["model"],
            "data": {"path": self.ensure_data(), "preprocess_actors": 1},
            "train": {"num_workers": workers, "cpus_per_worker": 1, "deepspeed": "zero2", "batch_size": self.p["batch_size"],
                      "epochs": 1, "max_steps": steps, "lr": 1e-4, "warmup_ratio": 0.0, "checkpoint_every": 0,
                      "log_every": 10, "name": f"{name}-{workers}w-{int(time.time())}",
                      "storage_path": str((self.out / "ray_runs").resolve())},
            "eval": {"every_epoch": False},
        }, "benchmark")


class StepRecorder:
    """Wraps a batch iterator: when each batch arrives, how long next() blocked, when the loop ended."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.waits: list[float] = []
        self.end: float | None = None

    def wrap(self, iterable):
        it = iter(iterable)
        try:
            while True:
                t0 = time.time()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                t1 = time.time()
                self.waits.append(t1 - t0)
                self.arrivals.append(t1)
                yield batch
        finally:  # the training loop breaks after its last step: the generator closes here
            self.end = time.time()

    def to_dict(self) -> dict:
        return {"arrivals": self.arrivals, "waits": self.waits, "end": self.end}


def timed_train_fn(config: dict) -> None:
    """The real `train_fn_per_worker`, with the Ray Data shard's batch iterator timed.

    Each rank writes `<storage>/<name>/bench_timings/rank<r>.json`: batch arrival times, time
    blocked in next(), loop end and torch's thread count in the worker.
    """
    import ray.train
    import torch

    from rayjobs import train_worker

    rec = StepRecorder()
    real = ray.train.get_dataset_shard

    class TimedShard:
        def __init__(self, shard):
            self._shard = shard

        def __getattr__(self, name):
            return getattr(self._shard, name)

        def iter_torch_batches(self, **kwargs):
            return rec.wrap(self._shard.iter_torch_batches(**kwargs))

    ray.train.get_dataset_shard = lambda name=None: TimedShard(real(name))
    try:
        train_worker.train_fn_per_worker(config)
    finally:
        ray.train.get_dataset_shard = real
        t = config["run"]["train"]
        out = Path(t["storage_path"]) / t["name"] / "bench_timings"
        out.mkdir(parents=True, exist_ok=True)
        rank = ray.train.get_context().get_world_rank()
        (out / f"rank{rank}.json").write_text(json.dumps({**rec.to_dict(), "threads": torch.get_num_threads()}))


def steady_state(timing: dict, warmup: int, notes_per_step: int, start: float, blocks: int = 3) -> dict:
    """Throughput after `warmup` steps (split in `blocks` equal step blocks), waits, start-up."""
    arrivals, waits, end = timing["arrivals"], timing["waits"], timing["end"]
    bounds = arrivals[warmup:] + [end]  # step i of the window runs bounds[i] -> bounds[i+1]
    step_times = np.diff(bounds)
    n = len(step_times)
    edges = np.linspace(0, n, min(blocks, n) + 1).astype(int)
    rates = [notes_per_step * (b - a) / (bounds[b] - bounds[a]) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    # the wait for batch k+1 happens inside step k: waits[warmup+1:] fall inside the window
    window_waits = np.asarray(waits[warmup + 1:])
    per_step_wait = window_waits / step_times[: len(window_waits)] if len(window_waits) else np.zeros(1)
    return {
        "notes_per_s": spread(rates, "notes/s"),
        "step_seconds": spread(step_times, "s"),
        "wait_fraction": float(window_waits.sum() / (end - bounds[0])) if len(window_waits) else 0.0,
        "wait_fraction_per_step": spread(per_step_wait, "fraction"),
        "startup_seconds": float(arrivals[1] - start) if len(arrivals) > 1 else float(end - start),
        "steps_measured": n,
        "threads": timing.get("threads"),
    }


def run_ray_training(ctx: Context, workers: int) -> dict:
    """One real TorchTrainer fit (build_trainer), timed per rank; cached per worker count."""
    if workers in ctx.runs:
        return ctx.runs[workers]
    from unittest import mock

    from rayjobs import train_worker
    from rayjobs.train import build_trainer, ensure_ray

    ensure_ray()
    cfg = ctx.run_cfg(workers, "bench-ray")
    log(f"train: Ray Train + Ray Data + DeepSpeed, {workers} worker(s), {cfg.train.max_steps} steps")
    start = time.time()
    with mock.patch.object(train_worker, "train_fn_per_worker", timed_train_fn):
        trainer = build_trainer(cfg)
    result = trainer.fit()
    wall = time.time() - start
    if result.error:
        raise result.error
    tdir = Path(cfg.train.storage_path) / cfg.train.name / "bench_timings"
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
    import torch

    from core.data.pipeline import iter_pair_batches_local
    from core.model.builders import build_model
    from core.step import forward_pair_batch

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


def ray_worker_threads() -> int:
    """torch threads a 1-CPU Ray actor gets (Ray sets OMP_NUM_THREADS from the CPU request)."""
    import ray

    from rayjobs.train import ensure_ray

    ensure_ray()

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self):
            import torch

            return torch.get_num_threads()

    actor = Probe.remote()
    try:
        return int(ray.get(actor.threads.remote()))
    finally:
        ray.kill(actor)


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------


def suite_train(ctx: Context) -> dict:
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


def suite_input(ctx: Context) -> dict:
    from core.data.pipeline import NotePreprocessor, pair_dataset
    from core.evaluation import read_notes
    from rayjobs.train import ensure_ray

    ensure_ray()
    cfg = ctx.run_cfg(1, "bench-input")
    # In-process capacity of the preprocessing transform (one core): the reference unit.
    prep = NotePreprocessor(cfg.model)
    notes = read_notes(cfg.data.path)
    local_rates = []
    for _ in range(3):
        t0 = time.time()
        for i in range(0, notes.num_rows, 64):
            prep(notes.slice(i, 64))
        local_rates.append(notes.num_rows / (time.time() - t0))
    # The Ray Data pipeline alone (pair join + actor-pool preprocessing), steady state after the first batch.
    pipe_rates, first_batch = [], []
    for rep in range(ctx.p["pipeline_repeats"]):
        log(f"input: Ray Data pair pipeline pass {rep + 1}/{ctx.p['pipeline_repeats']}")
        start = time.time()
        rows = 0
        for batch in pair_dataset(cfg.data.path, "train", cfg).iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            if not rows:
                first_batch.append(time.time() - start)
            rows += len(batch["q_note_id"])
        # Whole pass, join and actor start included (a lower bound on the streaming rate): the join
        # is a barrier, so on a small corpus most rows are ready by the time the first one arrives.
        pipe_rates.append(2 * rows / (time.time() - start))  # 2 notes (image + prompt) per pair row
    one = run_ray_training(ctx, 1)["rank0"]
    demand = one["notes_per_s"]["median"]
    waits = {"ray_1w": one["wait_fraction"]}
    if 2 in ctx.runs:
        waits["ray_2w"] = ctx.runs[2]["rank0"]["wait_fraction"]
    return {
        "figures": {
            "data_wait_fraction_1w": figure(one["wait_fraction"], TARGETS["data_wait_fraction"], False,
                                            "time in the shard iterator's next() / steady step time (Ray 1 worker)"),
            "pipeline_supply_over_trainer_demand": figure(float(np.median(pipe_rates)) / demand, 1.0, True,
                                                          "notes/s of a whole Ray Data pipeline pass (join, actor start included) / notes/s the 1-worker trainer consumes"),
            "pipeline_over_one_core": figure(float(np.median(pipe_rates)) / float(np.median(local_rates)), None, True,
                                             "Ray Data pipeline notes/s / NotePreprocessor in-process on one core"),
        },
        "absolute": {
            "preprocess_in_process_notes_per_s": spread(local_rates, "notes/s"),
            "pipeline_notes_per_s": spread(pipe_rates, "notes/s"),
            "pipeline_first_batch_s": spread(first_batch, "s"),
            "trainer_demand_notes_per_s": one["notes_per_s"],
            "wait_fraction_per_step_1w": one["wait_fraction_per_step"],
        },
        "config": {"wait_fraction_by_run": waits, "preprocess_actors": cfg.data.preprocess_actors,
                   "note": "one note = one image decoded and resized + one prompt tokenised"},
    }


def _embed_plain_job(run_dict: dict, data_dir: str, note_ids: list, batch_size: int) -> dict:
    """One plain-loop embedding process (1 torch thread): model build, then preprocess + embed."""
    import torch

    torch.set_num_threads(1)
    from core.config import RunConfig
    from core.data.pipeline import NotePreprocessor
    from core.evaluation import embed_batch, read_notes
    from core.model.builders import build_model

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


def _plain_embed(cfg, note_ids: np.ndarray, procs: int, batch_size: int) -> tuple[float, float]:
    """(steady notes/s, start-up s) of `procs` plain processes, each embedding its share."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    shares = np.array_split(note_ids, procs)
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_embed_plain_job, [cfg.to_dict()] * procs, [cfg.data.path] * procs,
                                [s.tolist() for s in shares], [batch_size] * procs))
    return len(note_ids) / max(r["embed_s"] for r in results), max(r["build_s"] for r in results)


def _timed_embed_with_ray(cfg, ids: np.ndarray, actors: int, batch_size: int) -> tuple[float, float]:
    """(steady notes/s, start-up s) of `rayjobs.evaluate.embed_with_ray`, its output iterator timed.

    Steady state starts once `actors` batches have arrived (every actor has loaded its model).
    """
    from unittest import mock

    import ray.data

    from rayjobs.evaluate import embed_with_ray

    rec, sizes, real = StepRecorder(), [], ray.data.Dataset.iter_batches

    def timed_iter_batches(self, *args, **kwargs):
        for batch in rec.wrap(real(self, *args, **kwargs)):
            sizes.append(len(batch["note_id"]))
            yield batch

    start = time.time()
    with mock.patch.object(ray.data.Dataset, "iter_batches", timed_iter_batches):
        embed_with_ray(cfg.data.path, cfg, ids, untrained=cfg.to_dict(), actors=actors, batch_size=batch_size, progress=False)
    skip = min(actors, len(sizes) - 1)
    t0 = rec.arrivals[skip - 1] if skip else start
    rate = sum(sizes[skip:]) / max(rec.arrivals[-1] - t0, 1e-9)
    return rate, t0 - start


def suite_embed(ctx: Context) -> dict:
    from core.evaluation import read_notes
    from rayjobs.train import ensure_ray

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


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def argsort_ranks(query: "torch.Tensor", cand: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """The plain baseline: full score matrix, full descending argsort, target's position."""
    import torch

    scores = query @ cand.T  # [Q, C]
    order = scores.argsort(dim=1, descending=True)  # [Q, C]
    return (order == target[:, None]).nonzero()[:, 1]  # position of the target: candidates sorted above it


def _recall_job(n_cand: int, dim: int, n_query: int, repeats: int, seed: int = 0) -> dict:
    """Runs in a fresh process: times each method and samples RSS above the inputs' footprint.

    Methods run one after the other; their large buffers are freed (returned to the OS) in
    between, so each method's peak is measured against the RSS just before it starts.
    """
    import threading

    import torch

    from core.metrics import target_ranks

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


def _in_fresh_process(fn, *args):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def suite_recall(ctx: Context) -> dict:
    figures, absolute, cases = {}, {}, []
    reps = ctx.p["recall_repeats"]
    for n_cand, dim, n_query in ctx.p["recall"]:
        tag = f"{n_cand // 1000}k_{dim}d"
        log(f"recall: {n_cand:,} candidates x {dim}-d, {n_query} queries")
        res = _in_fresh_process(_recall_job, n_cand, dim, n_query, reps)
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


def synthetic_events(n: int, seed: int = 0):
    """A click log with co-occurrence structure: users click near the note they viewed."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    n_notes, n_users = max(n // 10, 100), max(n // 20, 10)
    users = rng.integers(0, n_users, n)
    viewed = rng.integers(0, n_notes, n)
    clicked = (viewed + rng.integers(-20, 21, n)) % n_notes
    return pa.table({"user_id": users, "viewed_note_id": viewed, "clicked_note_id": clicked})


def mine_pairs_pandas(df, lower: float = 0.0, upper: float = float("inf"), top_t: int = 10):
    """Straightforward pandas version of `mine_pairs` (same semantics), the baseline."""
    import pandas as pd

    d = df[["user_id", "viewed_note_id", "clicked_note_id"]].dropna().astype("int64")
    d.columns = ["u", "a", "b"]
    d = d[d["a"] != d["b"]]
    uab = d.drop_duplicates()
    n_u = d[["u", "b"]].drop_duplicates().groupby("u").size().rename("n")
    w = uab.join(n_u, on="u")
    w["w"] = 1.0 / w["n"]
    s = w.groupby(["a", "b"], sort=False)["w"].sum().reset_index()
    s["score"] = np.round(s["w"].to_numpy(), 12)
    s = s[(s["score"] >= lower) & (s["score"] <= upper)]
    s = s.sort_values(["a", "score", "b"], ascending=[True, False, True])
    s = s.groupby("a", sort=False).head(top_t)
    return pd.DataFrame({"query_id": s["a"].to_numpy(), "target_id": s["b"].to_numpy(), "score": s["score"].to_numpy()})


def suite_mining(ctx: Context) -> dict:
    from core.data.pairs import mine_pairs

    figures, absolute, cases = {}, {}, []
    for n, repeats in ctx.p["mining"]:
        tag = f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"
        log(f"mining: {n:,} events")
        table = synthetic_events(n)
        df = table.to_pandas()
        t_arrow, t_pandas = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = mine_pairs(table)
            t_arrow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = mine_pairs_pandas(df)
            t_pandas.append(time.perf_counter() - t0)
        o = ours.to_pandas()
        match = len(o) == len(ref) and bool((o["query_id"].to_numpy() == ref["query_id"].to_numpy()).all()
                                            and (o["target_id"].to_numpy() == ref["target_id"].to_numpy()).all()
                                            and np.allclose(o["score"].to_numpy(), ref["score"].to_numpy()))
        figures[f"speedup_{tag}"] = figure(float(np.median(t_pandas)) / float(np.median(t_arrow)), TARGETS["mining_speedup"], True,
                                           f"pandas time / mine_pairs time on {n:,} events")
        absolute[f"mine_pairs_{tag}_events_per_s"] = spread([n / t for t in t_arrow], "events/s")
        absolute[f"pandas_{tag}_events_per_s"] = spread([n / t for t in t_pandas], "events/s")
        cases.append({"events": n, "pairs": len(o), "outputs_identical": match})
        del table, df, ours, ref, o
    return {"figures": figures, "absolute": absolute, "config": {"cases": cases, "top_t": 10}}


def _llama_1b_dir(root: Path, tokenizer_src: str) -> str:
    """A random-init 1.1B Llama (TinyLlama shape) saved as an HF directory, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    target = root / "llama-1b-random"
    if not (target / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_src)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(target)
        tok.save_pretrained(target)
    return str(target)


def _mfu_one(model_over: dict, batch_pairs: int, steps: int, warmup: int) -> dict:
    """bf16 ZeRO-2 steps of one model on one GPU with a synthetic batch; FLOPs by torch's counter."""
    import deepspeed
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from core.config import LossConfig, ModelConfig
    from core.deepspeed_config import load_deepspeed_config
    from core.model.builders import build_model
    from core.step import forward_pair_batch
    from rayjobs.train_worker import _init_process_group_if_local

    _init_process_group_if_local(True)
    mcfg, lcfg = ModelConfig(**{**model_over, "dtype": "bfloat16"}), LossConfig()
    model, tok = build_model(mcfg, lcfg)
    model.to("cuda")
    g = torch.Generator().manual_seed(0)
    T, S = mcfg.max_text_tokens, mcfg.image_size
    batch = {}
    for side, base in (("q_", 0), ("t_", batch_pairs)):
        batch[side + "input_ids"] = torch.randint(100, 1000, (batch_pairs, T), generator=g)
        batch[side + "attention_mask"] = torch.ones(batch_pairs, T, dtype=torch.long)
        batch[side + "pixel_values"] = torch.randint(0, 255, (batch_pairs, 3, S, S), generator=g, dtype=torch.uint8)
        batch[side + "has_image"] = torch.ones(batch_pairs, dtype=torch.bool)
        batch[side + "note_id"] = torch.arange(base, base + batch_pairs)
    with FlopCounterMode(display=False) as counter:
        loss, _ = forward_pair_batch(model, batch, lcfg, "cuda")
        loss.backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    ds = load_deepspeed_config("zero2", micro_batch_size=batch_pairs, world_size=1, lr=1e-4, weight_decay=0.0, warmup_steps=0,
                               total_steps=steps + warmup, grad_clip=1.0, precision="bfloat16", use_gpu=True)
    from core.deepspeed_config import use_this_interpreters_build_tools

    use_this_interpreters_build_tools()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = forward_pair_batch(engine, batch, lcfg, "cuda")
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    tflops = [flops / t / 1e12 for t in times]
    del engine, model
    torch.cuda.empty_cache()
    return {"flops_per_step": flops, "step_s": times, "tflops": tflops, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": [f / (peak / 1e12) for f in tflops] if peak else None}


def suite_gpu_mfu(ctx: Context) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": f"no CUDA GPU visible (torch {torch.__version__}, "
                                               f"torch.cuda.is_available() is False); MFU needs a GPU"}
    from core.model.builders import resolve_llm_path

    models = {"smollm2_default": {},  # the paper-style default ModelConfig: full SmolLM2-135M, MobileNetV2 224 px
              "llama_1b_random": {"llm": _llama_1b_dir(ctx.out / "models", resolve_llm_path("smollm2-135m"))}}
    figures, absolute = {}, {}
    for name, over in models.items():
        log(f"gpu_mfu: {name}")
        r = _mfu_one(over, batch_pairs=16 if ctx.size == "full" else 4, steps=10 if ctx.size == "full" else 3, warmup=3 if ctx.size == "full" else 1)
        absolute[f"{name}_step_s"] = spread(r["step_s"], "s")
        absolute[f"{name}_tflops"] = spread(r["tflops"], "TFLOP/s")
        if r["mfu"]:
            figures[f"mfu_{name}"] = figure(float(np.median(r["mfu"])), None, True,
                                            f"counted model FLOPs/s / dense bf16 peak {r['peak_tflops']:.0f} TFLOP/s")
        else:
            figures[f"tflops_{name}"] = figure(float(np.median(r["tflops"])), None, True, "achieved TFLOP/s (peak unknown for this GPU)")
    return {"figures": figures, "absolute": absolute, "config": {"gpu": torch.cuda.get_device_name(0), "precision": "bf16", "deepspeed": "zero2"}}


SUITE_FUNCS = {"train": suite_train, "input": suite_input, "embed": suite_embed, "recall": suite_recall,
               "mining": suite_mining, "gpu_mfu": suite_gpu_mfu}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, (int, float)):
        if not math.isfinite(x):
            return str(x)
        a = abs(x)
        return f"{x:,.0f}" if a >= 1000 else f"{x:.3g}" if a >= 0.01 else f"{x:.2e}"
    return str(x)


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks", "",
        f"Generated by `python -m rayjobs.benchmark --size {report['size']}` on {m['date']} "
        f"({report['total_seconds']:.0f} s). Every headline figure is a **ratio** against a baseline measured in the same run; "
        "absolute figures give min / median / max over repeats.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, ray {m['ray']}, Python {m['python']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_avg_start'])}, at the end "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_avg_end', []))} (1/5/15 min; the suite itself loads the "
        "cores, so a 1-min figure well above the core count at the start means other jobs shared the machine and single "
        "ratios carry that noise: compare min/median/max before reading a change as real).", "",
    ]
    for name, res in report["suites"].items():
        lines += [f"## {name}", ""]
        if res.get("status") != "ok":
            lines += [f"Skipped: {res.get('reason')}", ""]
            if name in ANALYSIS_FILE_NOTES:
                lines += [ANALYSIS_FILE_NOTES[name], ""]
            continue
        lines += ["| figure | value | target | met | what |", "|---|---|---|---|---|"]
        for key, f in res["figures"].items():
            target = f"{f['target_op']} {_fmt(f['target'])}" if f["target"] is not None else "–"
            lines.append(f"| {key} | {_fmt(f['value'])} | {target} | {_fmt(f['met'])} | {f['what']} |")
        lines += ["", "| measurement | unit | min | median | max | n |", "|---|---|---|---|---|---|"]
        for key, a in res["absolute"].items():
            lines.append(f"| {key} | {a['unit']} | {_fmt(a['min'])} | {_fmt(a['median'])} | {_fmt(a['max'])} | {a['n']} |")
        lines += ["", f"Config: `{json.dumps(res.get('config', {}), default=str)}`", ""]
        if name in ANALYSIS_FILE_NOTES:
            lines += [ANALYSIS_FILE_NOTES[name], ""]
    return "\n".join(lines)


# Explanations of missed targets, from profiles taken while building this suite (kept with the code
# so a regenerated BENCHMARKS.md keeps them; the numbers they cite are re-measured above).
ANALYSIS_FILE_NOTES: dict[str, str] = {
    "train": (
        "How it is measured: the real `build_trainer`/`train_fn_per_worker` run, with the Ray Data shard's "
        "`iter_torch_batches` wrapped to timestamp each batch (`timed_train_fn`); the plain loop is timed the same way. "
        "Both use the torch thread count a 1-CPU Ray worker gets (Ray sets OMP_NUM_THREADS=1). Steady state starts "
        "after the warm-up steps; start-up is seconds until the first step has finished. The per-step extras of the "
        "pipeline are DeepSpeed's ZeRO-2 gradient bucketing/clipping/scheduler, one gloo all-reduce of the finite-loss "
        "flag per step (`_all_true`), `loss.item()`/grad-norm reads and the Ray Data preprocessing actor sharing the "
        "cores; with a step of ~1 s they are a few per cent. On a 2-core machine shared with other jobs (see the load "
        "average) the step time of each run moves by tens of per cent between runs, so the ratio carries that noise; "
        "rerun on a quiet machine before reading a miss as a regression."),
    "recall": (
        "Reading the 576-d rows (profile: the timings above plus a float32 GEMM micro-benchmark on this machine, ~33 "
        "GFLOP/s on 2 cores). Both methods must compute the same Q x C x d score products; `core.metrics.target_ranks` "
        "does them as a float32 GEMM (float64 recheck only for candidates within a rounding margin of the target) and "
        "then counts, while the baseline adds a full descending argsort per query. The speed-up is therefore bounded by "
        "(GEMM + sort) / GEMM. At 64-d the GEMM is cheap and the sort dominates the baseline, so the count wins by "
        "more than 5x; at 576-d the GEMM alone (256 x 100k x 576 x 2 = 29.5 GFLOP, ~0.9 s at ~33 GFLOP/s) is what the "
        "chunked path measures (0.85 s median in the 2026-11-30 run), i.e. it runs at the machine's matmul floor, and "
        "the baseline's sort adds only ~1.4 s on top. No "
        "exact method can beat the baseline by 5x there on this CPU; the target holds where sorting is the cost "
        "(small d, large C). Memory is the win at every size: bounded by query_chunk x chunk_size scores, independent "
        "of C, while the baseline holds a [Q, C] score matrix plus int64 indices. Rank agreement: the case rows list "
        "how many queries got a different rank from the baseline; the baseline breaks float32 near-ties by sort "
        "position, the chunked ranks compare in float64, so a handful of differences on random data are the "
        "baseline's rounding, not the method's."),
    "mining": (
        "How it is measured: `core.data.pairs.mine_pairs` (NumPy sorts on packed int64 keys: one sort dedupes the "
        "(user, B, A) triples and groups (user, B) for N_u, another groups (A, B) for the scores) against a straightforward pandas version of the "
        "same REFERENCE \u00a72 algorithm (drop_duplicates, groupby, merge, sort), checked equal on the same events "
        "(`tests/rayjobs/test_benchmark.py::test_pandas_baseline_equals_mine_pairs`)."),
    "gpu_mfu": "No GPU was lent to the run that produced this file; the suite is implemented (bf16, ZeRO-2, FLOPs "
               "from torch.utils.flop_counter over one forward+backward) but unverified on hardware.",
}


def _quiet_ray_data() -> None:
    """No per-operator progress logging from Ray Data: the suite prints one line per step of its own."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    except Exception:  # an older/newer Ray without these flags: only noisier logs
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.benchmark", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Suites: " + ", ".join(SUITES))
    p.add_argument("--suite", action="append", choices=SUITES, help="suite to run (repeatable; default: all)")
    p.add_argument("--out", default="runs/bench", help="output directory (benchmarks.json, benchmarks.md, data, runs)")
    p.add_argument("--size", choices=tuple(SIZES), default="full", help="toy: seconds per suite (CI); full: the reported figures")
    p.add_argument("--write-md", metavar="PATH", help="also write the Markdown report here (e.g. BENCHMARKS.md)")
    p.add_argument("--from-json", metavar="PATH", help="re-render the Markdown of an earlier benchmarks.json (runs nothing)")
    return p


def run(suites, size: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(size, out)
    report = {"size": size, "machine": machine_info(), "suites": {}}
    started = time.time()
    for name in suites:
        log(f"suite {name} ({size}) ...")
        t0 = time.time()
        res = SUITE_FUNCS[name](ctx)
        res.setdefault("status", "ok")
        res["seconds"] = time.time() - t0
        report["suites"][name] = res
        met = [f"{k}={_fmt(f['value'])}{'' if f['met'] is None else (' ok' if f['met'] else ' MISSED')}" for k, f in res.get("figures", {}).items()]
        log(f"suite {name}: {res['status']} in {res['seconds']:.0f} s " + (", ".join(met) or res.get("reason", "")))
    report["total_seconds"] = time.time() - started
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        out.mkdir(parents=True, exist_ok=True)
    else:
        _quiet_ray_data()
        report = run(args.suite or list(SUITES), args.size, out)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2, default=str))
    md = render_markdown(report)
    (out / "benchmarks.md").write_text(md)
    if args.write_md:
        Path(args.write_md).write_text(md)
    log(f"wrote {out / 'benchmarks.json'} and {out / 'benchmarks.md'}" + (f" and {args.write_md}" if args.write_md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
