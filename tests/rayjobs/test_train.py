"""End-to-end CPU tests of the training job: real Ray Train V2 workers, DeepSpeed over gloo,
the synthetic corpus and tiny random-init models (tests/conftest.py: `smoke_data`, and the
4-step `resumable_run` per ZeRO stage that the resume tests share); the loss-falls and export
tests share one 30-step run (`trained_zero2`).

`python -m rayjobs.train` end to end on its own embedded Ray (each worker line printed once) is
the rerun in tests/reliability/test_faults.py::test_killed_driver_rerun_resumes_from_saved_step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_run_config
from rayjobs.train import build_trainer, run_training
from rayjobs.train_worker import _EagerBatches, train_fn_per_worker
from tests.conftest import RESUMABLE, copy_run

SMOKE = Path(__file__).resolve().parents[2] / "rayjobs" / "configs" / "smoke.yaml"
BATCH_SIZES_SEEN: list[int] = []


def counting_train_fn(config: dict) -> None:
    """The real worker function, its batch iterator wrapped through the `wrap_batches` seam."""
    def count(batches):
        for batch in batches:
            BATCH_SIZES_SEEN.append(len(batch["q_note_id"]))
            yield batch

    train_fn_per_worker(config, wrap_batches=count)


def test_eager_batches_fetch_the_first_one_in_the_background_then_continue_in_order():
    import threading

    started = threading.Event()

    def batches():
        started.set()  # runs in the background thread, before anyone iterates
        yield from (1, 2, 3)

    eager = _EagerBatches(batches())
    assert started.wait(5)
    assert list(eager) == [1, 2, 3]
    assert list(_EagerBatches(iter(()))) == []  # an empty epoch stays empty

    def broken():
        raise OSError("shard gone")
        yield

    with pytest.raises(OSError, match="shard gone"):  # raised where the batches are consumed
        list(_EagerBatches(broken()))


def smoke_cfg(tmp_path, data_dir, name, *overrides):
    return load_run_config(SMOKE, [f"data.path={data_dir}", f"train.storage_path={tmp_path / 'runs'}",
                                   f"train.name={name}", *overrides])


def history(final: dict) -> list[dict]:
    state = json.loads((Path(final["checkpoint"]) / "state.json").read_text())
    return state["history"]


def test_local_mode_worker_function_runs_twice_in_one_process(ray_local, tmp_path, smoke_data):
    """Ray Train local mode (num_workers=0) runs train_fn_per_worker in-process; a second run in
    the same process must not trip over the first run's (destroyed) DeepSpeed process groups.
    The second run goes through `run_training(train_fn=...)` with a wrapped batch iterator."""
    BATCH_SIZES_SEEN.clear()
    for name, train_fn in (("local", train_fn_per_worker), ("local-again", counting_train_fn)):
        final = run_training(smoke_cfg(tmp_path, smoke_data, name, "train.num_workers=0", "train.max_steps=2",
                                       "train.deepspeed=zero0", "train.checkpoint_every=0"), train_fn=train_fn)
        assert final["steps"] == 2
        assert [h["step"] for h in history(final)] == [1, 2]
        assert 0.0 <= final["R@10"] <= 1.0
    assert BATCH_SIZES_SEEN == [8, 8]  # the wrapper saw exactly the two training batches


def test_build_trainer_takes_callbacks_and_worker_function(ray_local, tmp_path, smoke_data):
    """Tune and the benchmark change the trainer through parameters, not by patching this module."""
    import ray.train

    class Marker(ray.train.UserCallback):
        pass

    cfg = smoke_cfg(tmp_path, smoke_data, "params")
    default = build_trainer(cfg)
    assert default.train_loop_per_worker is train_fn_per_worker and not default.run_config.callbacks
    marker = Marker()
    trainer = build_trainer(cfg, callbacks=[marker], train_fn=counting_train_fn)
    assert trainer.train_loop_per_worker is counting_train_fn
    assert trainer.run_config.callbacks == [marker]


def test_rerun_resumes_from_a_checkpoint_only_the_run_directory_knows(ray_local, tmp_path, smoke_data, capfd):
    """Ray's own run state may miss a checkpoint that is complete on disk (a driver killed between
    a worker writing it and the controller saving its state; local mode keeps no state at all).
    The rerun finds it in the run directory, skips a newer incomplete one, and continues."""
    args = ("train.num_workers=0", "train.deepspeed=zero0", "train.checkpoint_every=2")
    first = run_training(smoke_cfg(tmp_path, smoke_data, "orphan", *args, "train.max_steps=2"))
    assert first["steps"] == 2
    run_dir = Path(first["run_dir"])
    (run_dir / "checkpoint_00000003").mkdir()  # cut off before anything was written
    capfd.readouterr()

    final = run_training(smoke_cfg(tmp_path, smoke_data, "orphan", *args, "train.max_steps=4"))
    out = capfd.readouterr().out
    assert "checkpoint_00000003 is unusable (no state.json)" in out
    assert "resumed from step 2 (epoch 0, batch 2) of checkpoint_00000002" in out
    assert final["steps"] == 4
    assert [h["step"] for h in history(final)] == [1, 2, 3, 4]
    assert Path(final["checkpoint"]).name.startswith("checkpoint_00000004-resume")
    state = json.loads((Path(final["checkpoint"]) / "state.json").read_text())
    assert state["resumes"] == [{"step": 2, "checkpoint": "checkpoint_00000002"}]


def test_rerun_with_another_model_config_refuses_the_old_checkpoint(ray_local, tmp_path, smoke_data):
    """Same train.name, different model: resuming would load weights of another model (or train
    zero steps and report the old model's recall under the new config); it fails, naming the field."""
    args = ("train.num_workers=0", "train.deepspeed=zero0", "train.checkpoint_every=2", "train.max_steps=2")
    run_training(smoke_cfg(tmp_path, smoke_data, "changed", *args))
    with pytest.raises(Exception, match=r"model\.prompt_mode='micl' \(this run: 'basic'\)"):
        run_training(smoke_cfg(tmp_path, smoke_data, "changed", *args, "model.prompt_mode=basic"))


def mean_pair_loss(model, cfg, data_dir, batches=8) -> float:
    """Average loss over a fixed set of training batches (no gradient): far less noisy than
    comparing single-step training losses."""
    import torch

    from core.data.pipeline import iter_pair_batches_local
    from core.step import forward_pair_batch

    losses = []
    with torch.no_grad():
        for i, batch in enumerate(iter_pair_batches_local(str(data_dir), "train", cfg, 16, seed=123)):
            if i == batches:
                break
            losses.append(forward_pair_batch(model.eval(), batch, cfg.loss, "cpu")[0].item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained_zero2(ray_local, smoke_data, tmp_path_factory):
    """30 steps on 2 workers under ZeRO-2 at lr 0.01: (config, final metrics). The run whose loss
    must fall, and whose export the export test reloads in a fresh process."""
    from rayjobs.train import run_training

    cfg = smoke_cfg(tmp_path_factory.mktemp("zero2"), smoke_data, "zero2", "train.max_steps=30", "train.lr=0.01",
                    "train.checkpoint_every=0")
    return cfg, run_training(cfg)


def test_two_workers_zero2_loss_falls(smoke_data, trained_zero2):
    from core.checkpoint import load_export
    from core.model.builders import build_model

    cfg, final = trained_zero2
    assert final["steps"] == 30 and len(history(final)) == 30
    untrained, _ = build_model(cfg.model, cfg.loss, seed=cfg.train.seed)  # the run's starting point
    trained, _, _ = load_export(final["export"])
    before, after = mean_pair_loss(untrained, cfg, smoke_data), mean_pair_loss(trained, cfg, smoke_data)
    assert after < before - 0.03, f"loss did not fall: {before:.3f} -> {after:.3f}"
    saved = json.loads((Path(final["run_dir"]) / "final_metrics.json").read_text())
    assert saved["steps"] == 30 and "R@10" in saved and "short_query/R@10" in saved


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_checkpoint_resume_continues_from_saved_step(ray_local, tmp_path, smoke_data, resumable_run, stage):
    """Run 4 steps; rerun the same name asking for 6: it resumes at step 4 instead of restarting.
    (The 4-step run is the shared `resumable_run`; the rerun continues a copy of it.)"""
    from rayjobs.train import run_training

    first = resumable_run(stage)
    assert first["steps"] == 4
    before = history(first)
    copy_run(first, tmp_path / "runs", f"resume-{stage}")
    second = run_training(smoke_cfg(tmp_path, smoke_data, f"resume-{stage}", f"train.deepspeed={stage}",
                                    *RESUMABLE, "train.max_steps=6"))
    after = history(second)
    assert second["steps"] == 6
    assert [h["step"] for h in after] == [1, 2, 3, 4, 5, 6]
    # steps 1-4 come from the checkpoint's record, not from training them again
    assert after[:4] == before


def test_export_loads_without_ray_and_matches(smoke_data, trained_zero2):
    """The export gives the same validation recall in a fresh process with neither Ray nor DeepSpeed."""
    _, final = trained_zero2  # a 2-worker ZeRO-2 run's export
    code = f"""
import json, sys
from core.checkpoint import load_export
from core.evaluation import validation_recall
model, tok, cfg = load_export({final['export']!r})
cfg.data.path = {str(smoke_data)!r}
report = validation_recall(model.eval(), cfg.data.path, cfg, "cpu")
assert "ray" not in sys.modules and "deepspeed" not in sys.modules, "export pulled in ray/deepspeed"
print(json.dumps(report["all"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SMOKE.parents[2], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in fresh.items():
        if value is not None:
            # identical weights, same data: recall matches to float rounding
            assert abs(value - final[key]) < 1e-6, (key, value, final[key])
