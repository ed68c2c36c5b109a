"""Train a NoteLLM-2 model: Ray Data -> Ray Train (V2) TorchTrainer -> DeepSpeed ZeRO (+ LoRA).

Local, on an embedded Ray (CPU smoke run, tiny random models, seconds):
    python -m rayjobs.train --config rayjobs/configs/smoke.yaml
CPU demo (offline SmolLM2-135M + MobileNetV2 on the Tux Paint corpus, minutes):
    python -m rayjobs.train --config rayjobs/configs/demo.yaml --set loss.alpha=3
On a cluster (the same code; data and runs on shared storage):
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- \\
        python -m rayjobs.train --config rayjobs/configs/paper.yaml --set train.storage_path=s3://bucket/runs

Rerunning with the same `train.name` and `train.storage_path` resumes from the latest checkpoint.
Prints the run directory; writes `<run_dir>/final_metrics.json` (local disk or object storage) and, on local
storage, `<run_dir>/export/` (on object storage the export stays in the final checkpoint's `export/`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from core.config import ConfigError, PrepareConfig, RunConfig, load_run_config
from core.data.negatives import check_negatives
from core.data.prepare import prepare
from core.data.schema import PAIRS_FILES, check_prepared
from core.metrics import parse_metric_key
from core.paths import absolute, is_remote, join, storage_fs
from rayjobs.train_worker import train_fn_per_worker

EXIT_USAGE = 2
LOCAL_ENV = Path(__file__).resolve().parents[1] / "cluster" / "local_env.yaml"


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Absolute data/storage paths: Ray workers do not run in the driver's working directory."""
    import dataclasses

    if os.environ.get("RAY_ADDRESS"):
        for field, value in (("data.path", cfg.data.path), ("train.storage_path", cfg.train.storage_path)):
            if not is_remote(value) and not os.path.isabs(value):
                # under `ray job submit` the working dir is a temporary copy on the head node only
                print(f"[train] warning: {field}={value!r} is relative; on a cluster it resolves inside the "
                      "job's temporary working-dir copy. Use shared storage (s3://..., /mnt/efs/...).",
                      file=sys.stderr, flush=True)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        train=dataclasses.replace(cfg.train, storage_path=absolute(cfg.train.storage_path)),
    )


def local_env_defaults() -> dict[str, str]:
    """cluster/local_env.yaml's variables, as strings."""
    import yaml

    defaults = (yaml.safe_load(LOCAL_ENV.read_text()) or {}).get("env_vars") or {}
    return {key: str(value) for key, value in defaults.items()}


def apply_local_env() -> None:
    """Set cluster/local_env.yaml's variables in this process (a variable already set wins) before
    an embedded Ray starts: its raylet, Train controller, workers and Ray Data actors inherit them."""
    for key, value in local_env_defaults().items():
        os.environ.setdefault(key, value)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start an embedded local Ray.

    Locally Ray gets four times the physical cores as logical CPUs (at least 8). Logical CPUs
    are scheduling slots, not threads: a Tune trial's driver, the Train workers, the Ray Data
    preprocessing actors and Ray Data's read/join tasks each hold slots, and with only as many
    slots as cores the read tasks starve and the input pipeline stalls. Torch threads per worker
    follow `train.cpus_per_worker` (Ray sets OMP_NUM_THREADS from it).

    The embedded Ray starts with the dashboard (Ray Train's placement-group cleaner asks its
    state API about the controller every second and logs a warning each time it cannot) and with
    the environment defaults of cluster/local_env.yaml, which its workers inherit.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    apply_local_env()
    cpus = num_cpus or max(8, 4 * (os.cpu_count() or 1))
    ctx = ray.init(num_cpus=cpus, include_dashboard=True, configure_logging=False)
    print(f"[ray] embedded local Ray: {cpus} logical CPUs on {os.cpu_count()} cores, "
          f"dashboard http://{ctx.dashboard_url}", flush=True)


def ensure_data(cfg: RunConfig) -> None:
    """Prepare the corpus named in `data.corpus` when `data.path` has no prepared data; check
    prepared data (pairs must name existing notes: the pipeline's join would drop them silently)."""
    if is_remote(cfg.data.path):
        return
    present = [name for name in PAIRS_FILES.values() if (Path(cfg.data.path) / name).exists()]
    if len(present) == len(PAIRS_FILES):
        check_prepared(cfg.data.path)
        check_negatives(Path(cfg.data.path) / PAIRS_FILES["train"], cfg.data.hard_negatives)
        return
    if cfg.data.hard_negatives:  # refuse before preparing: a freshly prepared corpus has no mined negatives
        check_negatives(Path(cfg.data.path) / PAIRS_FILES["train"], cfg.data.hard_negatives)
    why = "no prepared data" if not present else f"prepared data without {sorted(set(PAIRS_FILES.values()) - set(present))}"
    print(f"[train] {why} in {cfg.data.path}; preparing corpus '{cfg.data.corpus}'", flush=True)
    prepare(cfg.data.corpus, cfg.data.path, PrepareConfig(num_notes=cfg.data.num_notes, seed=cfg.data.seed,
                                                          short_text_chars=cfg.data.short_text_chars))


def pairs_needed(cfg: RunConfig) -> int | None:
    """Training pairs a run capped by `train.max_steps` can consume (every worker drops its last
    partial batch), plus slack for batches skipped as non-finite (`nan_policy=skip`); None for
    whole epochs."""
    t = cfg.train
    if not t.max_steps:
        return None
    batches = t.max_steps + max(2, t.max_steps // 10)
    return batches * t.batch_size * max(t.num_workers, 1)


def build_trainer(cfg: RunConfig, *, callbacks: Sequence = (), train_fn: Callable[[dict], None] = train_fn_per_worker,
                  before_backward: Callable | None = None):
    """The TorchTrainer for one run (Tune trials reuse this).

    Args:
        cfg: the run's config (paths as the workers should see them).
        callbacks: Ray Train callbacks added to the run (Tune's report forwarding).
        train_fn: the per-worker function; the benchmark passes a timed wrapper of the real one.
        before_backward: `before_backward(module, step, rank)`, run on every worker before each
            backward pass (fault injection; see `rayjobs.train_worker.train_fn_per_worker`); it
            must be importable on the workers.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from core.data.features import feature_cache_off_reason
    from core.data.pipeline import pair_dataset

    t = cfg.train
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers, use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
    )
    run_config = ray.train.RunConfig(
        name=t.name, storage_path=absolute(t.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        callbacks=list(callbacks),
    )
    return TorchTrainer(
        train_fn,
        train_loop_config={"run": cfg.to_dict(), **({"before_backward": before_backward} if before_backward else {})},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        # With the frozen-feature cache the pipeline decodes no images; the workers read features.
        datasets={"train": pair_dataset(cfg.data.path, "train", cfg, max_pairs=pairs_needed(cfg),
                                        decode_images=feature_cache_off_reason(cfg) is not None)},
    )


def run_training(cfg: RunConfig, *, callbacks: Sequence = (),
                 train_fn: Callable[[dict], None] = train_fn_per_worker, before_backward: Callable | None = None) -> dict:
    """Fit one run; returns final metrics plus `run_dir`, `checkpoint` and `export` paths.

    `callbacks`, `train_fn` and `before_backward` go to `build_trainer`.
    """
    cfg = resolve_paths(cfg)
    ensure_data(cfg)  # before Ray starts: bad data fails in seconds
    ensure_ray()
    started = time.time()
    result = build_trainer(cfg, callbacks=callbacks, train_fn=train_fn, before_backward=before_backward).fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    storage = absolute(cfg.train.storage_path)
    run_dir = join(storage, cfg.train.name) if is_remote(storage) else Path(storage) / cfg.train.name
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    export = None
    if ckpt_path and not is_remote(ckpt_path) and (Path(ckpt_path) / "export").is_dir():
        export = run_dir / "export"
        tmp = run_dir / "export.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(ckpt_path) / "export", tmp)
        shutil.rmtree(export, ignore_errors=True)
        tmp.rename(export)
    final = {
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "steps": int(metrics.get("steps", metrics.get("step", 0))),
        "wall_seconds": time.time() - started,
        "run_dir": str(run_dir),
        "checkpoint": ckpt_path,
        "export": str(export) if export else None,
        "config": cfg.to_dict(),
    }
    text = json.dumps(final, indent=2, default=str)
    if is_remote(run_dir):
        fs, path = storage_fs(run_dir)
        with fs.open_output_stream(f"{path}/final_metrics.json") as f:
            f.write(text.encode())
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "final_metrics.json").write_text(text)
    return final


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rayjobs.train", description="Train a NoteLLM-2 model with Ray Train + DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: --set section.key=value, sections model, loss, data, train, eval; e.g.\n"
               "  --set model.num_visual_tokens=8 --set loss.alpha=3 --set train.deepspeed=zero3\n"
               "All keys are listed in README 'Configuration reference'.",
    )
    parser.add_argument("--config", required=True, help="run config YAML (rayjobs/configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from core.data.schema import DataError

    try:
        final = run_training(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[train] run directory: {final['run_dir']}")
    recall = {k: v for k, v in final.items() if (parse_metric_key(k) or ("",))[0] == "all"}
    print(f"[train] steps {final['steps']} loss {final.get('loss', float('nan')):.4f} validation "
          + " ".join(f"{k} {v:.4f}" for k, v in recall.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
