"""rayjobs.evaluate: CLI contract, Ray Data embedding == the in-process loop, end-to-end files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rayjobs import evaluate


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.core.test_evaluation import tiny_eval_setup

    return tiny_eval_setup(tmp_path_factory.mktemp("evaluate"))


def test_help_and_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--data", "--out", "--modality", "--ks", "--actors", "--batch-size", "--untrained", "--baseline"):
        assert flag in out
    assert "ray job submit" in evaluate.__doc__ and "python -m rayjobs.evaluate" in evaluate.__doc__


@pytest.mark.parametrize("argv,needle", [
    (["--checkpoint", "/no/such/export", "--data", "{data}", "--out", "{out}"], "--checkpoint /no/such/export"),
    (["--checkpoint", "{export}", "--data", "/no/such/data", "--out", "{out}"], "notes.parquet not found"),
    (["--untrained", "/no/such.yaml", "--data", "{data}", "--out", "{out}"], "no such config file"),
    (["--data", "{data}", "--out", "{out}"], "exactly one of"),
    (["--checkpoint", "{export}", "--data", "{data}", "--out", "metrics.txt"], "expected a .json"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_run, tmp_path, capsys, argv, needle):
    fill = {"data": tiny_run.data_dir, "export": tiny_run.export_dir, "out": str(tmp_path / "m.json")}
    assert evaluate.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_cli_process_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayjobs.evaluate", "--checkpoint", str(tmp_path / "nope"), "--data",
                           str(tmp_path), "--out", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("rayjobs.evaluate: error:")


def test_two_actors_equal_single_process_loop(ray_local, tiny_run):
    from core.checkpoint import load_export
    from core.data.pipeline import NotePreprocessor
    from core.embedding import embed_notes_local
    from core.evaluation import build_protocol, preprocess_notes_local, read_notes, read_pairs

    protocol = build_protocol(read_pairs(tiny_run.data_dir, "test"), pool="targets")
    needed = protocol.needed_ids()
    ids, emb = evaluate.embed_with_ray(tiny_run.data_dir, tiny_run.cfg, needed, checkpoint=tiny_run.export_dir,
                                       actors=2, batch_size=5, progress=False)
    assert sorted(ids.tolist()) == needed.tolist()  # every needed note once, nothing else

    model, _, cfg = load_export(tiny_run.export_dir)
    notes = preprocess_notes_local(read_notes(tiny_run.data_dir, needed), NotePreprocessor(cfg.model))
    local_ids, local_emb = embed_notes_local(model, notes, "cpu", batch_size=7)
    order, local_order = np.argsort(ids), np.argsort(local_ids.numpy())
    np.testing.assert_array_equal(ids[order], local_ids.numpy()[local_order])
    # Different batch compositions pad differently; masked positions must not change the result.
    np.testing.assert_allclose(emb[order], local_emb.numpy()[local_order], rtol=1e-4, atol=1e-5)


def test_end_to_end_checkpoint(ray_local, tiny_run, tmp_path, capsys):
    from core.evaluation import validation_recall

    out = tmp_path / "eval" / "tiny.json"
    rc = evaluate.main(["--checkpoint", tiny_run.export_dir, "--data", tiny_run.data_dir, "--out", str(out),
                        "--ks", "1,5,10,100000", "--actors", "2", "--batch-size", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "embedded" in printed and "/" in printed  # progress lines
    metrics = json.loads(out.read_text())
    for subset in ("all", "short_query", "short_target"):
        assert set(metrics[subset]) == {"R@1", "R@5", "R@10", "R@100000"}
        assert metrics[subset]["R@100000"] is None
    assert metrics["num_queries"] > 0 and metrics["pool_size"] > 0
    assert metrics["split"] == "test" and metrics["pool"] == "catalog" and metrics["ties"] == "expected"
    assert set(metrics["ci95"]["all"]) == {"R@1", "R@5", "R@10", "R@100000"}

    emb = pq.read_table(tmp_path / "eval" / "tiny.embeddings.parquet")
    assert emb.schema.field("embedding").type.value_type == "float"
    assert emb.num_rows == metrics["num_queries"] + metrics["pool_size"] == tiny_run.cfg.data.num_notes  # catalogue
    assert len(emb["embedding"][0].as_py()) == tiny_run.cfg.model.output_dim
    per_query = pd.read_parquet(tmp_path / "eval" / "tiny.per_query.parquet")
    assert len(per_query) == sum(metrics["num"].values())
    assert pd.read_csv(tmp_path / "eval" / "tiny.per_query.csv")["rank"].tolist() == per_query["rank"].tolist()
    table = (tmp_path / "eval" / "tiny.md").read_text()
    assert table.startswith("| model | all R@1 |") and "n/a" in table

    # Same numbers as the in-process validation path (same protocol, same embedding code).
    cfg = tiny_run.cfg
    local = validation_recall(tiny_run.model, tiny_run.data_dir, cfg, "cpu", split="test")
    tol = 1.0 / metrics["num_queries"] + 1e-9  # at most one float-noise rank flip
    for subset in ("all", "short_query", "short_target"):
        for key in ("R@1", "R@5", "R@10"):
            assert metrics[subset][key] == pytest.approx(local[subset][key], abs=tol)


def test_untrained_image_feature_baseline_and_text_ablation(ray_local, tiny_run, tmp_path):
    out = tmp_path / "vision.json"
    rc = evaluate.main(["--untrained", tiny_run.config_path, "--baseline", "image-features", "--data", tiny_run.data_dir,
                        "--out", str(out), "--ks", "1,10", "--actors", "1"])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["embedding"] == "image-features"
    emb = pq.read_table(tmp_path / "vision.embeddings.parquet")
    assert len(emb["embedding"][0].as_py()) == tiny_run.model.vision.feature_dim  # raw CLS width

    # Text-only ablation through the CLI: without images the image-feature baseline collapses
    # (every note gets the blank image's features: all scores tie, so recall is chance level).
    out_text = tmp_path / "vision_text.json"
    assert evaluate.main(["--untrained", tiny_run.config_path, "--baseline", "image-features", "--data", tiny_run.data_dir,
                          "--out", str(out_text), "--ks", "1,10", "--modality", "text"]) == 0
    per_query = pd.read_parquet(tmp_path / "vision_text.per_query.parquet")
    assert (per_query["rank"] == 0).all() and (per_query["tied"] > 0).all()
    text_metrics = json.loads(out_text.read_text())
    assert text_metrics["all"]["R@1"] == pytest.approx(1 / text_metrics["pool_size"])
