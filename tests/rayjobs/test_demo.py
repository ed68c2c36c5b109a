"""rayjobs.demo: the ablation table's pieces, and the real entrypoint end to end on tiny models
(`--space search_spaces/smoke.yaml`: the smoke sweep's base config, synthetic corpus), rerun to
check that finished runs are kept."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_run_config
from core.metrics import unflatten_recall
from rayjobs.demo import ablation_markdown

REPO = Path(__file__).resolve().parents[2]

FINAL = {"R@1": 0.25, "R@10": 0.5, "short_query/R@1": 0.1, "short_query/R@10": 0.4,
         "short_target/R@10": 0.3, "loss": 2.0, "steps": 8, "export": "/x/export"}


def test_a_runs_flat_metrics_regroup_by_subset():
    assert unflatten_recall(FINAL) == {"all": {"R@1": 0.25, "R@10": 0.5},
                                       "short_query": {"R@1": 0.1, "R@10": 0.4},
                                       "short_target": {"R@10": 0.3}}
    assert unflatten_recall({"loss": 1.0}) == {}


def test_ablation_table_has_a_row_per_variant_and_modality_and_the_papers_figures():
    metrics = {**unflatten_recall(FINAL), "ci95": {"all": {"R@1": [0.2, 0.3], "R@10": [0.4, 0.6]}}}
    table = ablation_markdown([("notellm2", "NoteLLM-2 (both)", {"both": (metrics, None), "text": ({}, None)}),
                               ("text_only", "text-only", {"both": (metrics, None)}),
                               ("image_features", "raw vision feature", {"both": (metrics, None)})], ks=[1, 10])
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 7  # 2 variants x (both, image, text) + the baseline's one row
    assert rows[0][0] == "| NoteLLM-2 (both)" and rows[0][1] == "both"
    assert rows[0][2:4] == ["25.0 (20.0–30.0)", "50.0 (40.0–60.0)"]  # all R@1, all R@10 in % with the interval
    assert rows[0][4] == "10.0"  # short_query R@1: no interval recorded, none shown
    assert rows[0][-1].startswith("76.50 / 55.72")  # REFERENCE §9, next to the paper's variant only
    assert rows[1][2] == "n/a" and rows[3][-1].strip(" |") == ""  # no image row measured; no paper row
    assert rows[6][0] == "| raw vision feature" and rows[6][1] == "both"


def run_demo_cli(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rayjobs.demo", "--quick", "--steps", "2", "--out", str(out),
                           "--space", "search_spaces/smoke.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


@pytest.mark.slow  # two demo drivers, each with its own embedded Ray: minutes
def test_quick_demo_end_to_end_on_tiny_models_then_rerun_keeps_finished_runs(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo_cli(out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    stages = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[demo] stage")]
    assert stages[0] == "[demo] stage 1/5 data" and stages[-1] == "[demo] stage 5/5 report"  # quick: no baseline
    assert "ETA" in proc.stdout

    ablation = json.loads((out / "ablation.json").read_text())["variants"]
    assert list(ablation) == ["basic", "notellm2"]
    finals = {name: json.loads((Path(entry["run_dir"]) / "final_metrics.json").read_text())
              for name, entry in ablation.items()}
    # NoteLLM-2 is the sweep's best trial (the smoke sweep keeps mICL + late fusion), not trained
    # again; the basic run is that trial's config with the two switches off
    assert "NoteLLM-2 (both) is the sweep's best trial, not trained again" in proc.stdout
    assert Path(ablation["notellm2"]["run_dir"]).parent == out / "tune" / "demo" / "runs"
    trial, basic = finals["notellm2"]["config"], finals["basic"]["config"]
    assert (basic["model"]["prompt_mode"], basic["model"]["late_fusion"]) == ("basic", False)
    assert {**basic["model"], "prompt_mode": "micl", "late_fusion": True} == trial["model"]
    assert basic["loss"] == trial["loss"] and basic["data"] == trial["data"]
    assert (out / "ablation_base.yaml").exists()
    for name, final in finals.items():
        assert final["steps"] == 2
        metrics = ablation[name]["metrics"]
        # chosen on validation (the run's own final_metrics), reported on test (measured once, here)
        assert unflatten_recall(final)["all"].keys() == {k for k, v in metrics["both"]["all"].items() if v is not None}
        for modality in ("both", "image", "text"):  # measured on the export, on the test split
            assert metrics[modality]["split"] == "test" and metrics[modality]["pool"] == "catalog"
            lo, hi = metrics[modality]["ci95"]["all"]["R@5"]
            assert lo <= metrics[modality]["all"]["R@5"] <= hi
        test_file = json.loads((Path(ablation[name]["run_dir"]) / "test_metrics.json").read_text())
        assert test_file["all"] == metrics["both"]["all"]
    table = (out / "ablation.md").read_text()
    assert "basic MLRM" in table and "NoteLLM-2 (both)" in table and "untrained" not in table
    assert "test-split numbers" in table and "NoteLLM-2 (both) − basic MLRM" in table  # a paired difference

    with open(out / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert len(board) == 2  # the sweep's trial (= NoteLLM-2) and the basic run
    metric = load_run_config(REPO / "rayjobs/configs/smoke.yaml").eval.metric  # the run config's ranking metric
    values = [float(row["val/" + metric]) for row in board]  # ranked on validation
    assert values == sorted(values, reverse=True)
    assert all(row["test/" + metric] != "" for row in board)  # test reported beside it
    assert (out / "leaderboard.html").stat().st_size > 0

    again = run_demo_cli(out)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("already finished, kept") == 1  # basic; NoteLLM-2 is the trial again
    assert json.loads((out / "ablation.json").read_text())["variants"] == ablation


def test_progress_eta_follows_the_plan_then_the_machines_pace(monkeypatch, capsys):
    from rayjobs import demo

    clock = [0.0]
    monkeypatch.setattr(demo.time, "time", lambda: clock[0])
    progress = demo.Progress([("data", 1.0), ("ablation", 9.0)])
    progress.say("data", "start")
    assert "stage 1/2 data: start (elapsed 0.0 min, ETA ~10.0 min)" in capsys.readouterr().out
    clock[0] = 120.0  # the first minute of plan took two
    progress.advance(1.0)
    progress.say("ablation", "run 1/3")
    assert "ETA ~18.0 min" in capsys.readouterr().out
    progress.skip(3.0)  # one run reused: no longer planned
    progress.say("ablation", "run 2/3")
    assert "ETA ~12.0 min" in capsys.readouterr().out
