"""rayjobs.mine_negatives end to end: mine with a trained export on the test's Ray, check the rules on
what it wrote, then train on the mined directory through Ray Train with `data.hard_negatives`."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rayjobs import mine_negatives
from tests.conftest import RESUMABLE, SMOKE_CONFIG
from tests.reliability.conftest import saved_state


@pytest.fixture(scope="module")
def mined(ray_local, resumable_run, smoke_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined") / "synthetic-hn"
    rc = mine_negatives.main(["--checkpoint", resumable_run("zero2")["export"], "--data", str(smoke_data),
                              "--out", str(out), "--num-negatives", "3", "--rank-range", "2:60",
                              "--relative-margin", "0.05", "--batch-size", "32"])
    assert rc == 0
    return out


def test_mined_directory_holds_negatives_that_obey_the_rules(mined, smoke_data):
    pairs = pq.read_table(mined / "pairs_train.parquet")
    original = pq.read_table(smoke_data / "pairs_train.parquet")
    assert pairs.drop_columns(["negative_ids"]).equals(original)  # same pairs, same order
    events = pq.read_table(smoke_data / "events.parquet")
    co = {(a, b) for a, b in zip(events["viewed_note_id"].to_pylist(), events["clicked_note_id"].to_pylist())}
    related = set(zip(original["query_id"].to_pylist(), original["target_id"].to_pylist()))
    n = 0
    for q, negs in zip(pairs["query_id"].to_pylist(), pairs["negative_ids"].to_pylist()):
        assert len(negs) <= 3 and len(set(negs)) == len(negs)
        for c in negs:
            assert c != q and (q, c) not in related and (c, q) not in related and (q, c) not in co and (c, q) not in co
        n += len(negs)
    assert n > pairs.num_rows  # most pairs got negatives
    report = json.loads((mined / "negatives_report.json").read_text())
    assert report["pairs"] == pairs.num_rows and report["search"] == "exact"
    assert report["candidates_seen"] == report["eligible"] + sum(v for k, v in report["removed"].items() if k != "query")
    assert n <= report["eligible"]  # the sample of K is drawn from the eligible
    # the rest of the directory is the original's files (hard links on one filesystem)
    assert (mined / "notes.parquet").stat().st_ino == (smoke_data / "notes.parquet").stat().st_ino


@pytest.mark.slow  # a 2-worker Ray Train run on the mined data
def test_training_with_mined_negatives_sees_them_in_the_loss(ray_local, mined, resumable_run, tmp_path):
    """Same seed, model init and batch order as the resumable smoke run; the only change is K = 3
    extra candidates per pair, so the first step's loss must be higher (a larger denominator)."""
    from core.config import load_run_config
    from rayjobs.train import run_training

    cfg = load_run_config(SMOKE_CONFIG, [f"data.path={mined}", f"train.storage_path={tmp_path}", "train.name=hn",
                                         "train.deepspeed=zero2", *RESUMABLE, "train.max_steps=2",
                                         "data.hard_negatives=3"])
    final = run_training(cfg)
    with_negatives = saved_state(final["checkpoint"])["history"]
    without = saved_state(resumable_run("zero2")["checkpoint"])["history"]
    assert [h["step"] for h in with_negatives] == [1, 2]
    assert with_negatives[0]["loss"] > without[0]["loss"] + 0.05, (with_negatives[0], without[0])


def test_bad_arguments_exit_2_with_one_line(smoke_data, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    assert mine_negatives.main(["--checkpoint", str(export), "--data", str(smoke_data), "--out", str(tmp_path / "o")]) == 2
    assert "not a model export" in capsys.readouterr().err
    (export / "config.yaml").write_text("{}")
    for argv, needle in ((["--rank-range", "5:5"], "--rank-range"), (["--relative-margin", "1"], "--relative-margin"),
                         (["--out", str(smoke_data)], "must differ"), (["--out", "s3://b/x"], "object storage")):
        out = ["--out", str(tmp_path / "o")] if "--out" not in argv else []
        assert mine_negatives.main(["--checkpoint", str(export), "--data", str(smoke_data), *out, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_training_on_data_without_negatives_fails_in_one_line(smoke_data, tmp_path, capsys):
    from rayjobs import train

    rc = train.main(["--config", str(SMOKE_CONFIG), "--set", f"data.path={smoke_data}", "--set", "data.hard_negatives=2",
                     "--set", f"train.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and any("rayjobs.mine_negatives" in line for line in err), err
    # data.path with nothing prepared yet: a prepared corpus would have no negatives, so it refuses before preparing
    rc = train.main(["--config", str(SMOKE_CONFIG), "--set", f"data.path={tmp_path / 'fresh'}", "--set",
                     "data.hard_negatives=2", "--set", f"train.storage_path={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and any("negative_ids" in line for line in err), err
    assert not (tmp_path / "fresh" / "pairs_train.parquet").exists()
