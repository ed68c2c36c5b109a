"""Hyperparameter sweeps: Ray Tune + Optuna (TPE, persisted study) + ASHA over TorchTrainer runs.

Local, on an embedded Ray (3 tiny trials, a couple of minutes on 2 CPU cores):
    python -m rayjobs.tune --space search_spaces/smoke.yaml
CPU demo sweep over L, alpha and tau init:
    python -m rayjobs.tune --space search_spaces/demo.yaml --num-samples 6
Resume a sweep that was interrupted (finished trials are kept, unfinished ones resume from their
own Train checkpoints, errored ones are retried from theirs):
    python -m rayjobs.tune --space search_spaces/smoke.yaml --resume
On a cluster (sweep directory on shared storage):
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- \\
        python -m rayjobs.tune --space search_spaces/paper.yaml --storage /mnt/shared/notellm2/tune

Three levels, as in the Ray Train V2 docs: `ray.tune.Tuner` runs `run_trial` (the trial driver,
a plain function), which builds the trial's RunConfig (base config + `section.key` overrides) and
fits the TorchTrainer of `rayjobs.train`; `rayjobs.train_worker.train_fn_per_worker` trains.

Sweep directory `<storage>/<name>/`:
    trial_<id>/              Tune: result.json, progress.csv, TensorBoard events (one row per validation)
    runs/<name>-<trial_id>/  each trial's Train run: checkpoints, tensorboard/, run_config.yaml,
                             final_metrics.json (the trial id is stable, so a resumed trial
                             resumes its own checkpoints)
    optuna.db                the Optuna study (`optuna-dashboard sqlite:///<sweep dir>/optuna.db`)
    sweep.json               the validated sweep spec
    leaderboard.{csv,md,html} written at the end (`python -m rayjobs.leaderboard --storage <sweep dir>`)
`tensorboard --logdir <storage>` shows every trial's validation curves and training scalars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from core.config import ConfigError, RunConfig, dump_run_config, with_values
from core.paths import absolute, is_remote, join
from rayjobs.train import ensure_data, ensure_ray, run_training
from search_spaces.schema import SweepSpec, decode_params, load_sweep

EXIT_USAGE = 2
RUNS_DIR = "runs"
STUDY_FILE = "optuna.db"
SPEC_FILE = "sweep.json"
ROUND_ATTR = "epochs_done"
"""ASHA's time attribute: set on epoch-end validation reports only, so the final report of a trial
is never a stopping point (a stop there would kill the trial before it writes final_metrics.json)."""


class SweepReportCallback(TuneReportCallback):
    """Forward validation reports of a Train run to its Tune trial.

    Only reports carrying the sweep metric (epoch-end and final validation) reach Tune: the
    per-step reports in between have no recall, and Tune requires the metric in every result.
    `done` is renamed (Tune would end the trial on it before the driver writes its outputs) and
    the Train run's name and directory are added so the leaderboard can join trials and runs.
    """

    def __init__(self, metric: str, run_name: str, run_dir: str):
        super().__init__()
        self.metric, self.run_name, self.run_dir = metric, run_name, run_dir

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        row = tune_result(metrics[0], self.metric, self.run_name, self.run_dir)
        if row is not None:
            super().after_report(run_context, [row], checkpoint)


def tune_result(reported: dict, metric: str, run_name: str, run_dir: str) -> dict | None:
    """The Tune result for one `ray.train.report` of rank 0, or None when it carries no `metric`."""
    if metric not in reported:
        return None
    row = dict(reported)
    final = bool(row.pop("done", 0))
    row.update(train_done=int(final), run_name=run_name, run_dir=run_dir)
    if not final:
        row[ROUND_ATTR] = int(row.get("epoch", 0))
    return row


class SweepProgress(Callback):
    """One line per trial start, validation result, completion and error, with finished counts."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total = metric, total

    def _counts(self, trials, ending=None, as_status: str = "") -> str:
        """Counts with `ending` (the trial being reported, whose status Tune updates after the
        callback) counted as `as_status`."""
        status = [as_status if t is ending else t.status for t in trials]
        done, failed, running = (status.count(s) for s in ("TERMINATED", "ERROR", "RUNNING"))
        return f"{done}/{self.total} finished, {failed} errored, {running} running"

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={short_value(v)}" for k, v in (trial.config or {}).items())
        print(f"[tune] trial {trial.trial_id} running: {params} ({self._counts(trials, trial, 'RUNNING')})", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        kind = "final" if result.get("train_done") else f"epoch {result.get(ROUND_ATTR)}"
        print(f"[tune] trial {trial.trial_id} {kind} validation: {self.metric} "
              f"{short_value(result.get(self.metric))} at step {result.get('step')}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} finished ({self._counts(trials, trial, 'TERMINATED')})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} errored ({self._counts(trials, trial, 'ERROR')})", flush=True)


def short_value(v: Any) -> str:
    """A sampled value for a progress line: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def prepare_base(spec: SweepSpec) -> dict:
    """The base run config of every trial (fixed parameters applied, local paths absolute)."""
    raw = spec.base_raw()
    raw["data"]["path"] = absolute(raw["data"]["path"])  # trials run in their own working directory
    for key in ("llm", "vision"):
        if Path(raw["model"][key]).exists():  # a local model directory (registry names stay as they are)
            raw["model"][key] = os.path.abspath(raw["model"][key])
    return raw


def trial_run_config(base: dict, params: dict, run_name: str, runs_dir: str) -> RunConfig:
    """One trial's RunConfig: base + sampled params, its own stable run name under the sweep."""
    cfg = RunConfig.from_dict(with_values(base, decode_params(params)), f"trial {run_name}")
    cfg.train.name = run_name
    cfg.train.storage_path = runs_dir
    return cfg


DATA_TASK_CPUS = 1.0
"""Slots left per trial for Ray Data's read/join tasks: without them a trial's input pipeline
stalls behind its own preprocessing actors and workers (seen with two smoke trials on 8 CPUs)."""


def per_trial_resources(cfg: RunConfig, driver_cpus: float) -> dict[str, float]:
    """Logical resources one trial needs: its driver, the Train workers, the Ray Data actors and
    a slot for Ray Data tasks."""
    t = cfg.train
    workers = max(t.num_workers, 1)
    cpus = driver_cpus + (t.num_workers * t.cpus_per_worker) + cfg.data.preprocess_actors + DATA_TASK_CPUS
    return {"CPU": cpus, "GPU": float(workers if t.use_gpu else 0)}


def max_concurrent_trials(cluster: dict[str, float], need: dict[str, float]) -> int:
    """How many trials fit at once: Train runs start only when all their workers fit, so more
    trial drivers than that would just wait (the Ray docs' advice for Train inside Tune)."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def run_trial(params: dict, *, sweep: str, metric: str, base: dict, runs_dir: str) -> None:
    """The Tune trainable: train one configuration; metrics reach Tune through SweepReportCallback."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{sweep}-{trial_id}"  # stable across --resume: the trial id is restored
    cfg = trial_run_config(base, params, run_name, runs_dir)
    run_dir = Path(runs_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(cfg, run_dir / "run_config.yaml")  # the leaderboard reads it for unfinished runs
    print(f"[tune] trial {trial_id}: Train run {run_dir}", flush=True)
    final = run_training(cfg, callbacks=[SweepReportCallback(metric, run_name, str(run_dir))])
    if metric not in final:
        reported = sorted(k for k in final if k != "config")
        raise RuntimeError(f"trial {trial_id}: metric {metric!r} was never reported "
                           f"(a K above the candidate pool is not applicable); reported: {reported}")


def build_search(spec: SweepSpec, study_url: str):
    """Seeded Optuna TPE over the sweep's parameters, its study persisted in an RDB (SQLite) file."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(study_url)
    return OptunaSearch(space=spec.optuna_space(), metric=spec.metric, mode=spec.mode, seed=spec.seed,
                        study_name=spec.name, storage=storage)


def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: reaching max_t is not a reason to stop (the final report follows)
    return ASHAScheduler(time_attr=ROUND_ATTR, metric=spec.metric, mode=spec.mode, max_t=s.max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def _trainable(spec: SweepSpec, base: dict, runs_dir: str):
    import ray.tune

    fn = ray.tune.with_parameters(run_trial, sweep=spec.name, metric=spec.metric, base=base, runs_dir=runs_dir)
    return ray.tune.with_resources(fn, {"CPU": spec.driver_cpus})


def trial_name(trial) -> str:
    """Short trial names/directories (`trial_<id>`) instead of Tune's parameter-laden default."""
    return f"trial_{trial.trial_id}"


def sweep_paths(storage: str, name: str) -> tuple[str, str]:
    """(storage root, sweep directory) as absolute paths or URIs."""
    root = absolute(storage)
    return root, join(root, name)


def check_same_parameters(sweep_dir: Path, spec: SweepSpec) -> None:
    """Tune restores a sweep as it was started, whatever the resuming invocation asks for: refuse
    to resume when the parameters (fixed ones included: data path, step budget) have changed."""
    saved_file = sweep_dir / SPEC_FILE
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text()).get("parameters")
    current = json.loads(json.dumps(spec.to_dict()["parameters"], default=str))
    if saved is not None and saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ConfigError(f"{sweep_dir} holds a sweep run with other parameters ({', '.join(changed)}); "
                          "resume it with those, or start a new one (--name NAME, or another directory)")


def run_sweep(spec: SweepSpec, *, storage: str | None = None, name: str | None = None,
              num_samples: int | None = None, resume: bool = False, study_url: str | None = None,
              num_cpus: int | None = None) -> dict:
    """Run (or resume) a sweep; returns `{"sweep_dir", "best", "leaderboard"}`."""
    import ray
    import ray.tune

    if name:
        spec.name = name
    if num_samples:
        spec.num_samples = num_samples
    root, sweep_dir = sweep_paths(storage or spec.storage, spec.name)
    local = not is_remote(sweep_dir)
    exists = ray.tune.Tuner.can_restore(sweep_dir) if not local or Path(sweep_dir).exists() else False
    if resume and not exists:  # e.g. killed before Tune saved any state: nothing is lost
        print(f"[tune] --resume: no Tune state in {sweep_dir} yet; starting the sweep", flush=True)
        resume = False
    if not resume and exists:
        raise ConfigError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, "
                          "or --name NAME for a new one")
    if resume and local:
        check_same_parameters(Path(sweep_dir), spec)
    runs_dir = join(sweep_dir, RUNS_DIR)
    if local:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        study_url = study_url or f"sqlite:///{Path(sweep_dir) / STUDY_FILE}"
        (Path(sweep_dir) / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, default=str))
    elif study_url is None:
        local_db = Path(absolute("runs")) / f"optuna-{spec.name}.db"
        local_db.parent.mkdir(parents=True, exist_ok=True)
        study_url = f"sqlite:///{local_db}"
        print(f"[tune] sweep storage is remote; the Optuna study is kept in {local_db}", flush=True)

    base = prepare_base(spec)
    probe = spec.run_config({k: p.probe_values()[0] for k, p in spec.searched.items()}, base)
    ensure_ray(num_cpus)
    ensure_data(probe)  # once here, not racing in concurrent trials
    need = per_trial_resources(probe, spec.driver_cpus)
    concurrency = max_concurrent_trials(ray.cluster_resources(), need)
    print(f"[tune] sweep '{spec.name}': {spec.num_samples} trials, metric {spec.metric} ({spec.mode}); "
          f"each trial holds {need['CPU']:g} CPU / {need['GPU']:g} GPU -> {concurrency} at a time; "
          f"directory {sweep_dir}", flush=True)
    print(f"[tune] watch: tensorboard --logdir {root}   |   optuna-dashboard {study_url}", flush=True)

    trainable = _trainable(spec, base, runs_dir)
    if resume:
        print(f"[tune] resuming {sweep_dir}: finished trials are kept", flush=True)
        tuner = ray.tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                search_alg=build_search(spec, study_url), scheduler=build_scheduler(spec),
                num_samples=spec.num_samples, max_concurrent_trials=concurrency,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=spec.name, storage_path=root, verbose=0,
                callbacks=[SweepProgress(spec.metric, spec.num_samples)],
            ),
        )
    started = time.time()
    results = tuner.fit()
    best = None
    try:
        best_result = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="last")
        best = {"config": best_result.config, spec.metric: best_result.metrics.get(spec.metric),
                "run_dir": best_result.metrics.get("run_dir")}
    except (RuntimeError, KeyError, ValueError):
        pass
    print(f"[tune] sweep done in {time.time() - started:.0f}s: {len(results)} trials, "
          f"{results.num_errors} errored", flush=True)
    board = None
    if local:
        from rayjobs.leaderboard import write_leaderboard

        board = write_leaderboard(sweep_dir, out_dir=sweep_dir, metric=spec.metric, mode=spec.mode)
    return {"sweep_dir": sweep_dir, "best": best, "leaderboard": board, "num_errors": results.num_errors}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rayjobs.tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweep NoteLLM-2 hyperparameters with Ray Tune + Optuna + ASHA over Ray Train runs.",
        epilog="Sweep files: search_spaces/*.yaml (format: search_spaces/schema.py).",
    )
    parser.add_argument("--space", required=True, help="sweep YAML, e.g. search_spaces/smoke.yaml")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the sweep's num_samples)")
    parser.add_argument("--storage", default=None, help="directory or URI the sweep directory goes under (default: the sweep's storage)")
    parser.add_argument("--name", default=None, help="sweep name (default: the sweep's name, i.e. its file name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are not rerun")
    parser.add_argument("--study-storage", default=None, metavar="URL",
                        help="Optuna RDB storage URL (default: sqlite:///<sweep dir>/optuna.db)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded local Ray (no RAY_ADDRESS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        print("error: --num-samples must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = load_sweep(args.space)
        out = run_sweep(spec, storage=args.storage, name=args.name, num_samples=args.num_samples,
                        resume=args.resume, study_url=args.study_storage, num_cpus=args.num_cpus)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if out["best"]:
        print(f"[tune] best trial: {spec.metric} {short_value(out['best'][spec.metric])} with {out['best']['config']}")
    if out["leaderboard"]:
        print(f"[tune] leaderboard: {out['leaderboard']['html']}")
    return 1 if out["num_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
