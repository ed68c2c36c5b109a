"""Training with the loss options of issue 18, end to end on CPU (Ray Train local mode, DeepSpeed
over gloo, tiny random-init models): GradCache gives the plain run's per-step losses; a
Matryoshka run reports, evaluates and ranks every trained width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_run_config

SMOKE = Path(__file__).resolve().parents[2] / "rayjobs" / "configs" / "smoke.yaml"
LOCAL = ("train.num_workers=0", "train.checkpoint_every=0", "eval.every_epoch=false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from core.data.prepare import prepare

    out = tmp_path_factory.mktemp("lossdata") / "synthetic"
    prepare("synthetic", str(out), num_notes=80, seed=0)
    return out


def run(tmp_path, data_dir, name, *overrides) -> dict:
    from rayjobs.train import run_training

    cfg = load_run_config(SMOKE, [f"data.path={data_dir}", f"train.storage_path={tmp_path / 'runs'}",
                                  f"train.name={name}", *LOCAL, *overrides])
    return run_training(cfg)


def losses(final: dict) -> list[float]:
    state = json.loads((Path(final["checkpoint"]) / "state.json").read_text())
    return [h["loss"] for h in state["history"]]


@pytest.mark.slow
def test_grad_cache_run_has_the_plain_runs_losses(tmp_path, data_dir):
    """ZeRO-2 (DeepSpeed's engine.backward per chunk, one reduction at the last), mICL with
    duplicate masking: 4 steps of chunks of 2 pairs give the unchunked run's losses."""
    steps = ("train.max_steps=4", "train.deepspeed=zero2")
    plain = run(tmp_path, data_dir, "plain", *steps)
    chunked = run(tmp_path, data_dir, "chunked", *steps, "loss.grad_cache_chunk_size=2")
    a, b = losses(plain), losses(chunked)
    assert len(a) == len(b) == 4 and len(set(a)) == 4  # the weights moved between steps
    assert b == pytest.approx(a, abs=1e-5, rel=0)


@pytest.mark.slow
def test_matryoshka_run_reports_evaluates_and_ranks_every_width(ray_local, tmp_path, data_dir, capsys):
    import torch

    from core.checkpoint import load_export
    from core.data.pipeline import NotePreprocessor
    from core.embedding import embed_batch
    from core.evaluation import preprocess_notes_local, read_notes, validation_recall
    from rayjobs import evaluate
    from rayjobs.leaderboard import write_leaderboard

    final = run(tmp_path, data_dir, "mrl", "train.max_steps=3", "train.deepspeed=zero0", "loss.matryoshka_dims=[4, 8, 16]",
                "loss.matryoshka_weights=[1, 1, 2]")
    for d in (4, 8, 16):  # the final validation scored each trained prefix
        assert 0.0 <= final[f"dim{d}/R@10"] <= 1.0 and f"dim{d}/short_query/R@10" in final
    assert final["dim16/R@10"] == pytest.approx(final["R@10"])  # the widest prefix is the embedding

    out = tmp_path / "eval" / "mrl.json"
    args = ["--checkpoint", final["export"], "--data", str(data_dir), "--split", "val", "--ks", "1,10"]
    assert evaluate.main([*args, "--out", str(out)]) == 0  # one embedding pass, every trained width
    metrics = json.loads(out.read_text())
    assert set(metrics["dims"]) == {"4", "8", "16"}
    assert evaluate.main([*args, "--out", str(tmp_path / "eval" / "mrl4.json"), "--dim", "4"]) == 0
    only4 = json.loads((tmp_path / "eval" / "mrl4.json").read_text())
    assert only4["dim"] == 4 and "dims" not in only4
    tol = 1.0 / metrics["num_queries"] + 1e-9  # Ray Data batches pad differently: one float-noise flip at most
    assert only4["all"]["R@10"] == pytest.approx(metrics["dims"]["4"]["all"]["R@10"], abs=tol)
    assert metrics["dims"]["4"]["all"]["R@10"] == pytest.approx(final["dim4/R@10"], abs=tol)
    assert "mrl [both] 8-d" in (tmp_path / "eval" / "mrl.md").read_text()
    assert evaluate.main([*args, "--out", str(tmp_path / "x.json"), "--dim", "17"]) == 2
    assert "--dim 17: the embedding has 16 dimensions" in capsys.readouterr().err

    # the export's embedding call at a width: truncated, then normalised
    model, _, cfg = load_export(final["export"])
    notes = preprocess_notes_local(read_notes(str(data_dir)).slice(0, 6), NotePreprocessor(cfg.model))
    full, at8 = embed_batch(model, notes, "cpu"), embed_batch(model, notes, "cpu", dim=8)
    assert at8.shape == (6, 8)
    torch.testing.assert_close(at8, torch.nn.functional.normalize(full[:, :8], dim=-1))
    local = validation_recall(model, str(data_dir), cfg, "cpu", split="val", dims=[8])
    assert set(local["dims"]) == {8}
    assert local["dims"][8]["all"]["R@10"] == pytest.approx(metrics["dims"]["8"]["all"]["R@10"], abs=tol)

    board = write_leaderboard(tmp_path / "runs")
    header = Path(board["csv"]).read_text().splitlines()[0].split(",")
    assert {"val/R@10", "val/dim4/R@10", "val/dim8/R@10", "val/dim16/R@1"} <= set(header)
    assert "val/dim4/short_query/R@10" not in header  # per-width columns: all pairs only
