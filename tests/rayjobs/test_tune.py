"""rayjobs.tune: the pieces (result forwarding, resources, Optuna search, ASHA) and, marked slow,
the smoke sweep end to end through TorchTrainer workers, killed and resumed on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.config import load_run_config
from rayjobs import tune
from search_spaces import load_sweep

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "search_spaces" / "smoke.yaml"


# ----------------------------------------------------------------------------- fast unit tests

def test_only_validation_reports_reach_tune():
    step = {"loss": 1.0, "step": 3, "epoch": 0}
    assert tune.tune_result(step, "R@10", "sw-1", "/r/sw-1") is None
    epoch_end = {"loss": 0.9, "step": 6, "epoch": 1, "R@10": 0.4}
    row = tune.tune_result(epoch_end, "R@10", "sw-1", "/r/sw-1")
    assert row[tune.ROUND_ATTR] == 1 and row["train_done"] == 0 and row["run_dir"] == "/r/sw-1"
    final = {"loss": 0.8, "step": 12, "epoch": 1, "R@10": 0.5, "done": 1}
    row = tune.tune_result(final, "R@10", "sw-1", "/r/sw-1")
    # `done` would make Tune end the trial before the driver writes final_metrics.json; the final
    # report carries no ASHA time attribute, so it is never a stopping point
    assert "done" not in row and row["train_done"] == 1 and tune.ROUND_ATTR not in row
    assert final["done"] == 1  # the worker's dict is not modified


def test_resources_and_concurrency():
    cfg = load_run_config(REPO / "rayjobs/configs/smoke.yaml")  # 2 workers x 1 CPU, 1 data actor
    need = tune.per_trial_resources(cfg, driver_cpus=1.0)
    assert need == {"CPU": 5.0, "GPU": 0.0}  # + 1 driver + 1 slot for Ray Data tasks
    assert tune.max_concurrent_trials({"CPU": 8.0}, need) == 1
    assert tune.max_concurrent_trials({"CPU": 16.0}, need) == 3
    assert tune.max_concurrent_trials({"CPU": 2.0}, need) == 1  # never 0: Ray reports the shortage
    paper = load_run_config(REPO / "rayjobs/configs/paper.yaml")  # 8 GPU workers per trial
    need = tune.per_trial_resources(paper, driver_cpus=1.0)
    assert need["GPU"] == 8.0
    assert tune.max_concurrent_trials({"CPU": 256.0, "GPU": 16.0}, need) == 2


def test_trial_config_has_a_stable_run_name(tmp_path: Path):
    spec = load_sweep(SMOKE)
    base = tune.prepare_base(spec)
    assert os.path.isabs(base["data"]["path"])  # trials run in their own working directory
    cfg = tune.trial_run_config(base, {"loss.alpha": 1.0, "model.num_visual_tokens": 2}, "smoke-abc12", str(tmp_path))
    assert (cfg.train.name, cfg.train.storage_path) == ("smoke-abc12", str(tmp_path))
    assert (cfg.loss.alpha, cfg.model.num_visual_tokens) == (1.0, 2)


def test_optuna_search_is_seeded_and_persisted(tmp_path: Path):
    import optuna

    spec = load_sweep(SMOKE)
    url_a, url_b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    search_a, search_b = tune.build_search(spec, url_a), tune.build_search(spec, url_b)
    proposals_a = [search_a.suggest(f"t{i}") for i in range(3)]
    proposals_b = [search_b.suggest(f"t{i}") for i in range(3)]
    assert proposals_a == proposals_b  # the sweep's seed fixes the proposals
    for p in proposals_a:
        assert set(p) == set(spec.searched)
        assert p["model.num_visual_tokens"] in (2, 4) and 1.0 <= p["loss.temperature_init"] <= 4.0
    search_a.on_trial_complete("t0", {spec.metric: 0.5})
    study = optuna.load_study(study_name=spec.name, storage=url_a)  # what optuna-dashboard opens
    assert len(study.trials) == 3 and study.trials[0].value == 0.5


def test_asha_decides_on_epoch_end_rounds_only():
    spec = load_sweep(SMOKE)
    sched = tune.build_scheduler(spec)
    assert sched._time_attr == tune.ROUND_ATTR and sched._max_t == spec.scheduler.max_t
    assert sched._stop_last_trials is False


def test_cli_usage_errors(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as err:
        tune.main(["--help"])
    assert err.value.code == 0 and "--resume" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base_config": str(REPO / "rayjobs/configs/smoke.yaml"), "metric": "R@10",
                                   "parameters": {"loss.alpah": {"type": "choice", "values": [1.0]}}}))
    assert tune.main(["--space", str(bad)]) == 2
    assert "did you mean 'alpha'" in capsys.readouterr().err
    (tmp_path / "taken" / "smoke").mkdir(parents=True)
    (tmp_path / "taken" / "smoke" / "tuner.pkl").write_text("x")
    assert tune.main(["--space", str(SMOKE), "--storage", str(tmp_path / "taken")]) == 2
    assert "pass --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end (slow)

def _smoke_space(tmp_path: Path, **fixed) -> Path:
    """The shipped smoke sweep with its data kept under tmp_path."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["base_config"] = str(REPO / raw["base_config"])
    raw["parameters"]["data.path"] = {"type": "fixed", "value": str(tmp_path / "data")}
    for key, value in fixed.items():
        raw["parameters"][key] = {"type": "fixed", "value": value}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tune_cmd(space: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rayjobs.tune", "--space", str(space), "--storage", str(storage),
            "--num-cpus", "8", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": ""}


def _trial_status(sweep_dir: Path) -> dict[str, str]:
    """trial_id -> status from Tune's latest experiment state file ({} while none is written)."""
    # the newest session's file by its timestamped name: at the end Tune rewrites the older
    # sessions' files too, so modification times do not tell which is current
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        state = json.loads(states[-1].read_text())
    except ValueError:
        return {}
    out = {}
    for trial_json, _meta in state.get("trial_data", []):
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        out[trial.get("trial_id")] = trial.get("status")
    return out


def _prepare_with_empty_test_split(space: Path, data_dir: Path) -> None:
    """The sweep's data as its trials would prepare it, then pairs_test.parquet without rows."""
    import pyarrow.parquet as pq

    from core.data.prepare import prepare

    # base config + the sweep's fixed parameters (80 notes: 8 steps per epoch), as its trials see them
    cfg = load_sweep(space).run_config({})
    prepare(cfg.data.corpus, data_dir, num_notes=cfg.data.num_notes, seed=cfg.data.seed,
            short_text_chars=cfg.data.short_text_chars)
    test = pq.read_table(data_dir / "pairs_test.parquet")
    assert test.num_rows > 0
    pq.write_table(test.slice(0, 0), data_dir / "pairs_test.parquet")


def _check_finished_sweep(sweep_dir: Path, whole_history: set[str]) -> None:
    """What a finished smoke sweep leaves behind: runs, Tune results, study, logs, leaderboard.

    `whole_history`: trials that ran start to end in one driver. A trial cut off by a driver kill
    resumes from its epoch-end checkpoint; its epoch report can be lost with the killed driver."""
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 3
    finals = [json.loads((r / "final_metrics.json").read_text()) for r in runs if (r / "final_metrics.json").exists()]
    assert finals, "at least the first trial runs to the end (ASHA cannot stop a lone trial)"
    for final in finals:
        assert "R@5" in final and final["steps"] == 12
    # every trial reported its epoch-end validation to Tune (what ASHA decides on), then the final one
    trial_dirs = list(sweep_dir.glob("trial_*"))
    assert len(trial_dirs) == 3 and {f"trial_{t}" for t in whole_history} <= {d.name for d in trial_dirs}
    for trial_dir in trial_dirs:
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        for epoch_report in results[:-1]:
            assert epoch_report[tune.ROUND_ATTR] * 8 == epoch_report["step"] and not epoch_report["train_done"]
        if not results[0]["train_done"]:
            assert results[0][tune.ROUND_ATTR] == 1 and results[0]["step"] == 8
        else:  # Tune's result.json after --resume can hold only the final row (seen for finished and cut-off
            # trials alike); the epoch-1 reports are checked in the first driver's progress lines instead
            assert len(results) == 1 and results[0]["step"] == 12
        assert results[-1]["train_done"] == 1 or len(results) == 1  # or stopped by ASHA at epoch 1
    # one run config per trial, with the trial's sampled values applied
    params = [yaml.safe_load((r / "run_config.yaml").read_text()) for r in runs]
    assert all(p["train"]["name"] == r.name for p, r in zip(params, runs))
    # Optuna study persisted with every finished trial
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3, [t.state for t in study.trials]
    # TensorBoard: Tune's per-trial event files and the workers' own
    assert list(sweep_dir.glob("*/events.out.tfevents.*"))
    assert list((sweep_dir / "runs").glob("*/tensorboard/events.out.tfevents.*"))
    # the leaderboard was written at the end and ranks all three trials
    csv_text = (sweep_dir / "leaderboard.csv").read_text().splitlines()
    assert len(csv_text) == 1 + 3
    header = csv_text[0].split(",")
    assert header[:6] == ["rank", "run", "kind", "trial_id", "status", "val/R@5"]  # ranked on validation
    values = [float(line.split(",")[5]) for line in csv_text[1:] if line.split(",")[5]]
    assert values == sorted(values, reverse=True) and len(values) == 3
    assert (sweep_dir / "leaderboard.html").stat().st_size > 2000


@pytest.mark.slow
def test_smoke_sweep_killed_then_resumed_finishes_without_rerunning_trials(tmp_path: Path):
    """The smoke sweep end to end through TorchTrainer workers, with the driver and its embedded
    Ray killed once the first trial has finished; `--resume` runs only what is left.

    The test split is emptied before the sweep: nothing that chooses (validation, ASHA, Optuna,
    the leaderboard's ranking) may read it, so the sweep must finish and rank on validation alone."""
    space = _smoke_space(tmp_path)
    _prepare_with_empty_test_split(space, tmp_path / "data")
    storage = tmp_path / "tune"
    sweep_dir = storage / "smoke"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_tune_cmd(space, storage), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    first = None
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            finished = [t for t, s in _trial_status(sweep_dir).items() if s == "TERMINATED"]
            if finished:  # Tune has recorded a finished trial in its experiment state
                first = finished[0]
                break
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-sweep
        proc.wait()
        log.close()
    first_log = (tmp_path / "first.log").read_text()
    assert first is not None, first_log[-5000:]
    assert "[tune] trial" in first_log and "running" in first_log  # per-trial progress lines
    # the finished trial's epoch-end validation reached Tune (what ASHA decides on) before its final one
    assert f"[tune] trial {first} epoch 1 validation" in first_log, first_log[-5000:]
    first_final = sweep_dir / "runs" / f"smoke-{first}" / "final_metrics.json"
    assert first_final.exists()
    before = (first_final.stat().st_mtime_ns, json.loads(first_final.read_text())["steps"])

    proc = subprocess.run(_tune_cmd(space, storage, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "resuming" in proc.stdout
    after = (first_final.stat().st_mtime_ns, json.loads(first_final.read_text())["steps"])
    assert after == before, "the finished trial was retrained"
    status = _trial_status(sweep_dir)
    assert len(status) == 3 and set(status.values()) == {"TERMINATED"}, (status, proc.stdout[-5000:])
    _check_finished_sweep(sweep_dir, whole_history={first})


def test_a_sweep_is_resumed_only_with_its_own_parameters(tmp_path: Path):
    from core.config import ConfigError
    from search_spaces.schema import ParameterSpec

    spec = load_sweep(SMOKE)
    (tmp_path / tune.SPEC_FILE).write_text(json.dumps(spec.to_dict(), default=str))
    tune.check_same_parameters(tmp_path, spec)  # unchanged: resumable
    spec.parameters["train.max_steps"] = ParameterSpec(key="train.max_steps", type="fixed", value=8)
    with pytest.raises(ConfigError, match=r"other parameters \(train\.max_steps\)"):
        tune.check_same_parameters(tmp_path, spec)
