"""Fault injection on CPU with local Ray: a killed training worker, a killed driver and a
checkpoint cut off mid-write are all survived, with nothing lost (RELIABILITY.md).

The sweep-driver kill (`--resume` runs only the unfinished trials) is covered by
tests/rayjobs/test_tune.py::test_smoke_sweep_killed_then_resumed_finishes_without_rerunning_trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import RESUMABLE, copy_run
from tests.reliability.conftest import FAULT_RUN, PY, REPO, saved_state, smoke_args, smoke_cfg, subprocess_env
from tests.reliability.faults import fake_checkpoint

# A resumed run restores weights, optimizer and scheduler state exactly and replays the same
# batches, so it matches the uninterrupted run to float round-off (observed: bit-identical).
LOSS_TOLERANCE = 1e-4


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("checkpoint_*/state.json"))


def train_workers() -> list:
    """Ray Train worker processes of this test process's Ray (its descendants only: other Ray
    clusters on the machine are never touched)."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            text = proc.name() + " " + " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RayTrainWorker" in text:
            found.append(proc)
    return found


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run(ray_local, rel_data, reference_run, tmp_path):
    """SIGKILL one RayTrainWorker after the first periodic checkpoint: FailureConfig restarts the
    worker group, it resumes from the last checkpoint and ends with the same steps and loss."""
    from rayjobs.train import run_training

    storage = tmp_path / "runs"
    run_dir = storage / "killed-worker"
    killed: list[int] = []

    def killer():
        wait_for(lambda: complete_checkpoints(run_dir), 900, "the first checkpoint")
        victim = wait_for(train_workers, 60, "a RayTrainWorker process")[0]
        killed.append(victim.pid)
        victim.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    final = run_training(smoke_cfg(storage, rel_data, "killed-worker", *FAULT_RUN))
    thread.join(timeout=5)
    assert killed, "no worker was killed: the run finished before the first checkpoint appeared"

    state = saved_state(final["checkpoint"])
    history, reference = state["history"], saved_state(reference_run["checkpoint"])["history"]
    # a resume, not a restart from step 0 (which a deterministic run would also pass below)
    assert len(state["resumes"]) == 1 and state["resumes"][0]["step"] >= 3, state["resumes"]
    assert state["resumes"][0]["checkpoint"] == f"checkpoint_{state['resumes'][0]['step']:08d}"
    assert final["steps"] == reference_run["steps"] == 12
    assert [h["step"] for h in history] == list(range(1, 13)), "a step was lost or repeated"
    for got, want in zip(history, reference):
        assert abs(got["loss"] - want["loss"]) <= LOSS_TOLERANCE, (got, want)
    assert abs(final["loss"] - reference_run["loss"]) <= LOSS_TOLERANCE


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and every process under it: its process group and the Ray it started
    (raylet, GCS and workers run in their own sessions; left alone, they go on training and
    writing checkpoints for a few seconds after the driver dies)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


@pytest.mark.slow
def test_killed_driver_rerun_resumes_from_saved_step(rel_data, tmp_path):
    """SIGKILL the whole driver (its process group: driver + its embedded Ray) after a checkpoint;
    rerunning the same command resumes from that checkpoint's step instead of step 0.

    The rerun is also the end-to-end run of `python -m rayjobs.train` on its own embedded Ray, as a
    user runs it (once for both claims): Ray Train 2.60 would print every worker line twice, and
    its placement-group cleaner would warn every second without the dashboard's state API; the
    driver's output carries neither."""
    storage = tmp_path / "runs"
    run_dir = storage / "killed-driver"
    cmd = [PY, "-m", "rayjobs.train", *smoke_args(storage, rel_data, "killed-driver", *FAULT_RUN, "train.max_failures=0",
                                                  "train.log_every=1")]
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_TRAIN_ENABLE_PRINT_PATCH"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: complete_checkpoints(run_dir) or proc.poll() is not None, 900, "the first checkpoint")
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, f"driver ended on its own: {(tmp_path / 'first.log').read_text()[-2000:]}"
    saved = max((saved_state(p) for p in complete_checkpoints(run_dir)), key=lambda s: s["step"])
    assert 3 <= saved["step"] < 12

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = rerun.stdout + rerun.stderr
    (tmp_path / "rerun.log").write_text(out)
    assert rerun.returncode == 0, out[-3000:]
    resumed = [line for line in out.splitlines() if "[train] resum" in line]
    assert f"resumed from step {saved['step']}" in "\n".join(resumed), resumed or out[-3000:]
    # each worker line once: one line per step trained by the rerun, one header for its workers
    steps = [line.split("[train] ", 1)[1].split(" loss")[0] for line in out.splitlines() if "[train] step " in line]
    assert steps == [f"step {i}/12" for i in range(saved["step"] + 1, 13)], steps
    assert sum("[train] killed-driver: 2 worker(s)" in line for line in out.splitlines()) == 1
    assert out.count("Failed to query Ray Train Controller") <= 2  # was once a second without the dashboard
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["export"] and (Path(final["export"]) / "model.safetensors").is_file()
    history = saved_state(final["checkpoint"])["history"]
    assert final["steps"] == 12 and [h["step"] for h in history] == list(range(1, 13))
    assert history[:saved["step"]] == saved["history"], "steps before the kill were retrained"
    assert saved_state(final["checkpoint"])["resumes"] == [{"step": saved["step"], "checkpoint": f"checkpoint_{saved['step']:08d}"}]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_shard", "missing_state"])
def test_checkpoint_cut_off_mid_write_falls_back_to_previous(ray_local, rel_data, resumable_run, tmp_path, damage):
    """The latest checkpoint is incomplete: the rerun resumes from the one before it. The first
    run (4 steps, checkpoints at 2 and 4) is a copy of the shared `resumable_run`."""
    from rayjobs.train import run_training

    storage = tmp_path / "runs"
    name = f"cutoff-{damage}"
    first = resumable_run("zero2")
    latest = copy_run(first, storage, name) / Path(first["checkpoint"]).name
    assert latest.name == "checkpoint_00000004" and (latest.parent / "checkpoint_00000002" / "state.json").exists()
    before = saved_state(latest.parent / "checkpoint_00000002")["history"]  # retention deletes it later
    if damage == "truncated_shard":
        shard = max((latest / "ds").glob("*.pt"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (latest / "state.json").unlink()

    second = run_training(smoke_cfg(storage, rel_data, name, *RESUMABLE, "train.max_steps=6"))
    history = saved_state(second["checkpoint"])["history"]
    assert second["steps"] == 6 and [h["step"] for h in history] == list(range(1, 7))
    assert history[:2] == before
    # Steps 3-4 were trained again after the fall-back and saved under new names, so Ray's
    # retention never deletes a directory it still lists.
    assert Path(second["checkpoint"]).name.startswith("checkpoint_00000006-resume")
    assert list(latest.parent.glob("checkpoint_00000004-resume*/state.json"))


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    from rayjobs.resume import checkpoint_problem, resume_candidates

    good = fake_checkpoint(tmp_path, 2)
    assert checkpoint_problem(good) is None
    no_state = fake_checkpoint(tmp_path, 4)
    (no_state / "state.json").unlink()
    assert checkpoint_problem(no_state) == "no state.json"
    bad_json = fake_checkpoint(tmp_path, 6)
    (bad_json / "state.json").write_text('{"step": 6, "epo')
    assert "state.json unreadable" in checkpoint_problem(bad_json)
    cut = fake_checkpoint(tmp_path, 8)
    shard = cut / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:40])
    assert checkpoint_problem(cut) == "shard ds/zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated or corrupt"
    empty = fake_checkpoint(tmp_path, 10)
    for f in (empty / "ds").iterdir():
        f.unlink()
    assert checkpoint_problem(empty) == "no DeepSpeed model states under ds/"
    resumed = fake_checkpoint(tmp_path, 12)
    resumed.rename(tmp_path / "checkpoint_00000008-resume5")
    order = [p.name for p in resume_candidates(tmp_path)]
    assert order == [p.name for p in resume_candidates(tmp_path / "elsewhere", tmp_path / "checkpoint_00000010")]
    assert order == ["checkpoint_00000010", "checkpoint_00000008-resume5", "checkpoint_00000008", "checkpoint_00000006",
                     "checkpoint_00000004", "checkpoint_00000002"]


class _Payload:
    """Stands in for what a tampered checkpoint could carry: an arbitrary pickled object."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_loader_refuses_anything_but_weights(tmp_path, capfd):
    """Resume reads DeepSpeed files with torch.load(weights_only=True): tensors and DeepSpeed's
    bookkeeping classes load, a pickled callable is refused naming the file and never runs."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rayjobs.train_worker import _load_weights_only

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    _load_weights_only(engine)
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "zero_stage": ZeroStageEnum.gradients, "step": 3}, good)
    torch.save({"w": torch.ones(2), "payload": _Payload()}, bad)
    loaded = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["zero_stage"] == ZeroStageEnum.gradients
    capfd.readouterr()
    with pytest.raises(RuntimeError, match=r"bad\.pt holds objects that are not weights"):
        engine.checkpoint_engine.load(str(bad), map_location="cpu")
    assert "unpickled code ran" not in capfd.readouterr().out
