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

from core.config import load_run_config
from rayjobs.demo import ablation_markdown, final_recall

REPO = Path(__file__).resolve().parents[2]

FINAL = {"R@1": 0.25, "R@10": 0.5, "short_query/R@1": 0.1, "short_query/R@10": 0.4,
         "short_target/R@10": 0.3, "loss": 2.0, "steps": 8, "export": "/x/export"}


def test_final_recall_regroups_the_runs_flat_metrics_by_subset():
    assert final_recall(FINAL) == {"all": {"R@1": 0.25, "R@10": 0.5},
                                   "short_query": {"R@1": 0.1, "R@10": 0.4},
                                   "short_target": {"R@10": 0.3}}
    assert final_recall({"loss": 1.0}) == {"all": None, "short_query": None, "short_target": None}


def test_ablation_table_has_a_row_per_variant_and_modality_and_the_papers_figures():
    table = ablation_markdown([("notellm2", "NoteLLM-2 (both)", {"both": final_recall(FINAL), "text": {}}),
                               ("text_only", "text-only", {"both": final_recall(FINAL)})], ks=[1, 10])
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 6  # 2 variants x (both, image, text)
    assert rows[0][0] == "| NoteLLM-2 (both)" and rows[0][1] == "both"
    assert rows[0][2:4] == ["25.00", "50.00"]  # all R@1, all R@10 in %
    assert rows[0][-1].startswith("76.50 / 55.72")  # REFERENCE §9, next to the paper's variant only
    assert rows[1][2] == "n/a" and rows[3][-1].strip(" |") == ""  # no image row measured; no paper row


def run_demo_cli(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rayjobs.demo", "--quick", "--steps", "2", "--out", str(out),
                           "--space", "search_spaces/smoke.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


def test_quick_demo_end_to_end_on_tiny_models_then_rerun_keeps_finished_runs(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo_cli(out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    stages = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[demo] stage")]
    assert stages[0] == "[demo] stage 1/5 data" and stages[-1] == "[demo] stage 5/5 report"  # quick: no baseline
    assert "ETA" in proc.stdout

    ablation = json.loads((out / "ablation.json").read_text())
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
        assert metrics["both"] == final_recall(final)  # the run's own validation, not re-measured
        for modality in ("image", "text"):  # measured on the export
            assert 0.0 <= metrics[modality]["all"]["R@5"] <= 1.0
    table = (out / "ablation.md").read_text()
    assert "basic MLRM" in table and "NoteLLM-2 (both)" in table and "untrained" not in table

    with open(out / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert len(board) == 2  # the sweep's trial (= NoteLLM-2) and the basic run
    metric = load_run_config(REPO / "rayjobs/configs/smoke.yaml").eval.metric  # the run config's ranking metric
    values = [float(row[metric]) for row in board]
    assert values == sorted(values, reverse=True)
    assert (out / "leaderboard.html").stat().st_size > 0

    again = run_demo_cli(out)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("already finished, kept") == 1  # basic; NoteLLM-2 is the trial again
    assert json.loads((out / "ablation.json").read_text()) == ablation


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
