"""rayjobs.leaderboard on fabricated run directories: ranking, CSV columns, skipped runs, HTML
rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rayjobs import leaderboard
from tests.browser import dump_dom, requires_chromium, screenshot

RUNS = [  # name, L, alpha, tau0, R@10, short_query/R@10
    ("run-a", 4, 9.0, 3.0, 0.50, 0.30),
    ("run-b", 2, 1.0, 1.5, 0.70, 0.45),
    ("run-c", 8, 3.0, 2.2, 0.60, 0.40),
]


def _config(name: str, L: int, alpha: float, tau0: float) -> dict:
    return {
        "model": {"num_visual_tokens": L, "prompt_mode": "micl", "late_fusion": True, "lora": True, "lora_rank": 4},
        "loss": {"alpha": alpha, "temperature_init": tau0},
        "train": {"name": name, "lr": 2e-3},
        "eval": {"metric": "all/R@10", "ks": [1, 10]},
    }


def make_run(root: Path, name: str, L: int, alpha: float, tau0: float, r10: float, sq10: float) -> Path:
    run_dir = root / name
    ckpt = run_dir / "checkpoint_00000012"
    ckpt.mkdir(parents=True)
    history = [{"step": s, "loss": 2.0 / s + alpha / 100} for s in range(1, 13)]
    (ckpt / "state.json").write_text(json.dumps({"step": 12, "history": history}))
    final = {"loss": history[-1]["loss"], "temperature": 0.05 + tau0 / 100, "R@1": r10 / 3, "R@10": r10,
             "R@10 lo": r10 - 0.05, "R@10 hi": r10 + 0.05, "short_query/R@10": sq10, "short_target/R@10": sq10 + 0.01, "steps": 12, "wall_seconds": 7.5,
             "checkpoint": str(ckpt), "export": None, "config": _config(name, L, alpha, tau0)}
    (run_dir / "final_metrics.json").write_text(json.dumps(final))
    return run_dir


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for spec in RUNS:
        make_run(root, *spec)
    bad = root / "run-corrupt"
    bad.mkdir()
    (bad / "final_metrics.json").write_text("{not json")
    half = root / "run-missing" / "checkpoint_00000006"  # a run that died before writing final_metrics.json
    half.mkdir(parents=True)
    (half / "state.json").write_text("{}")
    return root


def test_ranking_columns_and_skipped(storage: Path, tmp_path: Path, capsys):
    out = leaderboard.write_leaderboard(storage, tmp_path / "board")
    assert out["metric"] == "val/R@10" and out["mode"] == "max"  # from eval.metric all/R@10, on validation
    assert out["ranked"] == ["run-b", "run-c", "run-a"]
    assert out["rows"] == 3 and out["skipped"] == 2
    printed = capsys.readouterr().out
    assert "run-corrupt" in printed and "run-missing" in printed

    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    for col in ("rank", "run", "kind", "val/R@10", "val/R@10 lo", "val/R@10 hi", "L", "alpha", "temperature_init",
                "temperature_final", "prompt_mode", "late_fusion", "lr", "lora_rank", "val/R@1", "val/short_query/R@10",
                "val/short_target/R@10", "steps", "wall_seconds", "checkpoint"):
        assert col in header, col
    assert [r["run"] for r in rows] == ["run-b", "run-c", "run-a"]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    best = rows[0]
    assert (int(best["L"]), float(best["alpha"]), float(best["temperature_init"])) == (2, 1.0, 1.5)
    assert float(best["val/R@10"]) == pytest.approx(0.70) and float(best["val/short_query/R@10"]) == pytest.approx(0.45)
    assert float(best["val/R@10 lo"]) == pytest.approx(0.65) and best["kind"] == "run"
    assert best["checkpoint"].endswith("checkpoint_00000012")
    md = Path(out["md"]).read_text()
    ranked = [line for line in md.splitlines() if line.startswith(("| 1 | run-", "| 2 | run-", "| 3 | run-"))]
    assert len(ranked) == 3
    assert ranked[0].endswith("| run-b/checkpoint_00000012 |")  # relative to the storage root in Markdown
    assert "| 0.7 (0.65–0.75) |" in ranked[0]  # the metric with its interval
    assert "ranked on the validation split" in md


def test_test_metrics_are_reported_beside_but_never_ranked_on(storage: Path, tmp_path: Path):
    """Test recall that disagrees with validation by construction: the ranking follows validation."""
    for name, r10 in (("run-a", 0.9), ("run-b", 0.1), ("run-c", 0.5)):  # test order opposite to validation's
        (storage / name / leaderboard.TEST_METRICS_FILE).write_text(json.dumps(
            {"all": {"R@10": r10}, "ci95": {"all": {"R@10": [r10 - 0.1, r10 + 0.1]}}, "pool": "catalog",
             "pool_size": 700}))
    out = leaderboard.write_leaderboard(storage, tmp_path / "board")
    assert out["ranked"] == ["run-b", "run-c", "run-a"]  # validation's order, not test's
    with open(out["csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["run-a"]["test/R@10"]) == pytest.approx(0.9)
    assert float(rows["run-a"]["test/R@10 hi"]) == pytest.approx(1.0) and rows["run-a"]["test_pool"] == "catalog 700"
    header = list(rows["run-a"])
    assert header.index("val/R@10") < header.index("test/R@10")
    assert "error" not in out and "test/ columns are reported, never ranked on" in Path(out["md"]).read_text()
    assert 'class="errorbar"' in Path(out["html"]).read_text()  # the intervals drawn on the knob plots


def test_metric_override_and_min_mode(storage: Path, tmp_path: Path):
    out = leaderboard.write_leaderboard(storage, tmp_path / "b1", metric="short_query/R@10")
    assert out["ranked"] == ["run-b", "run-c", "run-a"]
    out = leaderboard.write_leaderboard(storage, tmp_path / "b2", metric="loss")
    assert out["mode"] == "min" and out["ranked"][0] == "run-b"  # lowest alpha -> lowest fabricated loss


def test_sweep_json_and_tune_trial_without_final_metrics(storage: Path, tmp_path: Path):
    """A Tune trial stopped early (no final_metrics.json) is listed with its last validation."""
    (storage / "sweep.json").write_text(json.dumps({"metric": "R@10", "mode": "max"}))
    run_dir = storage / "runs" / "sw-0001"
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text(json.dumps(_config("sw-0001", 16, 19.0, 4.0)))
    trial = storage / "run_trial_0001"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    last = {"R@10": 0.65, "loss": 0.4, "step": 6, "epochs_done": 1, "trial_id": "0001", "run_name": "sw-0001",
            "run_dir": str(run_dir), "config": {"loss.alpha": 19.0}}
    (trial / "result.json").write_text(json.dumps({**last, "R@10": 0.2}) + "\n" + json.dumps(last) + "\n{torn")
    (trial / "progress.csv").write_text("step,loss\n3,1.5\n6,0.4\n")
    out = leaderboard.write_leaderboard(storage, tmp_path / "b")
    assert out["ranked"] == ["run-b", "sw-0001", "run-c", "run-a"]
    with open(out["csv"]) as f:
        row = next(r for r in csv.DictReader(f) if r["run"] == "sw-0001")
    assert row["status"].startswith("stopped") and row["L"] == "16" and row["trial_id"] == "0001"
    assert row["kind"] == "trial"
    # the knob plots show the sweep's trials only (the single runs do not vary its knobs)
    html_text = Path(out["html"]).read_text()
    alpha_plot = html_text[html_text.index('id="plot-alpha"'):html_text.index('id="plot-L"')]
    assert "sw-0001" in alpha_plot and "run-b" not in alpha_plot


def test_empty_storage_does_not_crash(tmp_path: Path):
    out = leaderboard.write_leaderboard(tmp_path, tmp_path / "b")
    assert out["rows"] == 0 and Path(out["html"]).exists()


def test_cli(storage: Path, tmp_path: Path):
    assert leaderboard.main(["--storage", str(storage), "--out", str(tmp_path / "cli")]) == 0
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {"leaderboard.csv", "leaderboard.md", "leaderboard.html"}
    assert leaderboard.main(["--storage", str(tmp_path / "nope")]) == 2


@requires_chromium
def test_html_renders_in_headless_chromium(storage: Path, tmp_path: Path):
    out = leaderboard.write_leaderboard(storage, tmp_path / "board")
    page = Path(out["html"])
    assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # no network
    png = tmp_path / "board.png"
    shot = screenshot(page, png, tmp_path / "profile1")
    assert png.exists(), shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    dom = dump_dom(page, tmp_path / "profile2")
    assert dom.count('<tr class="run') == 3
    for run in ("run-a", "run-b", "run-c"):
        assert run in dom
    for plot_id in ("plot-alpha", "plot-L", "plot-tau", "plot-curves"):
        assert f'id="{plot_id}"' in dom
    assert dom.count("<circle") >= 9  # 3 runs x (R@10 + short_query/R@10) on 3 plots, some shared
    assert dom.count("<polyline") == 3  # one loss curve per run
