"""What every suite shares: sizes and targets, the per-invocation context, figure/spread records,
batch-arrival timing and the steady-state arithmetic over it."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch
import yaml

from core.config import RunConfig
from core.data.prepare import prepare

PACKAGE_DIR = Path(__file__).resolve().parent
SMOKE_CONFIG = PACKAGE_DIR.parent / "configs" / "smoke.yaml"

BENCH_MODEL = yaml.safe_load((PACKAGE_DIR / "bench_model.yaml").read_text())
"""The `full` size's model (see bench_model.yaml for why this size)."""
TOY_MODEL = yaml.safe_load(SMOKE_CONFIG.read_text())["model"]
"""The `toy` size's model: the smoke run's tiny random-init model."""

SIZES = {
    # toy: the structure of every figure, not its value (CI); its time is process start-up, not steps
    "toy": dict(model=TOY_MODEL, num_notes=160, batch_size=8, warmup_steps=1, steps=4, pipeline_repeats=1,
                embed_batch=16, embed_repeats=1, recall=[(20_000, 64, 64)],
                recall_repeats=1, mining=[(100_000, 1)]),
    "full": dict(model=BENCH_MODEL, num_notes=240, batch_size=8, warmup_steps=5, steps=29, pipeline_repeats=2,
                 embed_batch=16, embed_repeats=2,
                 recall=[(100_000, 64, 256), (100_000, 576, 256), (1_000_000, 64, 32), (1_000_000, 576, 32)],
                 recall_repeats=3, mining=[(1_000_000, 3), (10_000_000, 1)]),
}
TARGETS = {"train_vs_plain": 0.85, "data_wait_fraction": 0.05, "embed_vs_plain": 0.9, "recall_speedup": 5.0,
           "mining_speedup": 3.0}


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
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil  # optional: Ray's default extra brings it

        ram_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        ram_gb = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram_gb, 1), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_avg_start": list(os.getloadavg())}


class Context:
    """What the suites of one invocation share: sizes, output dir, data dir, cached runs
    (train and input share the Ray training runs)."""

    def __init__(self, size: str, out: Path):
        self.size, self.p, self.out = size, SIZES[size], out
        self.data_dir = out / "data"
        self.runs: dict = {}

    def ensure_data(self) -> str:
        if not (self.data_dir / "pairs_train.parquet").exists():
            log(f"preparing synthetic corpus ({self.p['num_notes']} notes) in {self.data_dir}")
            prepare("synthetic", str(self.data_dir), num_notes=self.p["num_notes"], seed=0)
        return str(self.data_dir.resolve())

    def run_cfg(self, workers: int = 1, name: str = "bench") -> RunConfig:
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


def in_fresh_process(fn, *args):
    """`fn(*args)` in a spawned process (clean RSS, its own torch threads)."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def quiet_ray_data() -> None:
    """No per-operator progress logging from Ray Data: the suite prints one line per step of its own."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    except Exception:  # an older/newer Ray without these flags: only noisier logs
        pass
