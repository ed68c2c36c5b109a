"""rayjobs.benchmark: every suite at toy size yields well-formed, finite, positive figures (no timing
assertions), plus exact checks of the pieces the figures are computed from."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import rayjobs.benchmark
from rayjobs.benchmark import cli, gpu_mfu, harness, mining, recall


def test_help_and_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--suite", "--out", "--size", "--write-md", "--from-json"):
        assert flag in out
    assert "python -m rayjobs.benchmark" in rayjobs.benchmark.__doc__ and "ray job submit" in rayjobs.benchmark.__doc__


def test_steady_state_excludes_warmup_and_counts_waits():
    # 2 warm-up steps of 10 s, then 6 steps of 1 s each, each with 0.1 s blocked in next()
    arrivals = [100.0, 110.0] + [120.0 + i for i in range(6)]
    waits = [5.0, 0.1] + [0.1] * 6
    timing = {"arrivals": arrivals, "waits": waits, "end": 126.0, "threads": 1}
    s = harness.steady_state(timing, warmup=2, notes_per_step=16, start=90.0)
    assert s["steps_measured"] == 6
    assert s["notes_per_s"]["median"] == pytest.approx(16.0)
    assert s["step_seconds"]["min"] == pytest.approx(1.0) and s["step_seconds"]["max"] == pytest.approx(1.0)
    assert s["wait_fraction"] == pytest.approx(0.5 / 6.0)  # waits of batches 3..7 fall inside the window
    assert s["startup_seconds"] == pytest.approx(20.0)


def test_pandas_baseline_equals_mine_pairs():
    from core.data.pairs import mine_pairs

    events = mining.synthetic_events(20_000, seed=3)
    ours = mine_pairs(events, top_t=5).to_pandas()
    ref = mining.mine_pairs_pandas(events.to_pandas(), top_t=5)
    assert len(ours) == len(ref) > 0
    np.testing.assert_array_equal(ours["query_id"].to_numpy(), ref["query_id"].to_numpy())
    np.testing.assert_array_equal(ours["target_id"].to_numpy(), ref["target_id"].to_numpy())
    np.testing.assert_allclose(ours["score"].to_numpy(), ref["score"].to_numpy())


def test_argsort_baseline_equals_chunked_ranks():
    from core.metrics import target_ranks

    g = torch.Generator().manual_seed(0)
    cand, query = torch.randn(3000, 16, generator=g), torch.randn(40, 16, generator=g)
    target = torch.randint(0, 3000, (40,), generator=g)
    ours = target_ranks(query.double(), cand.double(), target, chunk_size=700)
    assert torch.equal(recall.argsort_ranks(query.double(), cand.double(), target), ours)


def test_gpu_suite_skips_with_reason_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite runs for real")
    res = gpu_mfu.run(harness.Context("toy", tmp_path))
    assert res["status"] == "skipped" and "GPU" in res["reason"]


@pytest.fixture(scope="module")
def toy_report(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--size", "toy", "--out", str(out), "--write-md", str(out / "BENCH.md")]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("suite", cli.SUITES)
def test_toy_suite_structure(toy_report, suite):
    report = json.loads((toy_report / "benchmarks.json").read_text())
    assert set(report["machine"]) >= {"cpu", "cores", "ram_gb", "torch", "ray", "date"}
    res = report["suites"][suite]
    assert res["status"] in ("ok", "skipped")
    if res["status"] == "skipped":
        assert suite == "gpu_mfu" and not torch.cuda.is_available() and res["reason"]
        return
    assert res["figures"] and res["absolute"]
    for name, f in res["figures"].items():
        assert math.isfinite(f["value"]) and f["value"] > 0, (name, f)
        assert f["met"] in (True, False, None)
    for name, a in res["absolute"].items():
        assert a["n"] >= 1 and 0 <= a["min"] <= a["median"] <= a["max"] and math.isfinite(a["max"]), (name, a)


@pytest.mark.slow
def test_markdown_written_and_rerendered(toy_report, tmp_path):
    md = (toy_report / "BENCH.md").read_text()
    assert md == (toy_report / "benchmarks.md").read_text()
    for suite in cli.SUITES:
        assert f"## {suite}" in md
    assert "cores" in md and "torch" in md
    assert cli.main(["--from-json", str(toy_report / "benchmarks.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks.md").read_text() == md
