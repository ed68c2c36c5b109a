"""Validation sharded across ranks: 2 gloo processes, each embedding half of the notes, give the
metrics of one process embedding all of them."""

from __future__ import annotations

import json
import os

import pytest

from core.config import RunConfig
from core.evaluation import validation_recall
from core.metrics import flatten_recall, flatten_recall_ci
from core.model.builders import build_model
from tests.conftest import tiny_model_dict
from tests.gloo import run_on_gloo_ranks


def _cfg(data_dir: str, feature_cache: str) -> RunConfig:
    return RunConfig.from_dict({"model": tiny_model_dict(), "data": {"path": data_dir, "feature_cache": feature_cache},
                                "eval": {"ks": [1, 5, 10], "batch_size": 8}})


def _metrics(rank: int, world: int, data_dir: str, feature_cache: str) -> dict:
    cfg = _cfg(data_dir, feature_cache)
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    report = validation_recall(model.eval(), data_dir, cfg, "cpu", rank=rank, world=world)
    return {**flatten_recall(report), **flatten_recall_ci(report), "num_queries": report["num_queries"]}


def _worker(rank: int, world: int, data_dir: str, feature_cache: str, out: str) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(_metrics(rank, world, data_dir, feature_cache), f)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from core.data.prepare import prepare

    out = tmp_path_factory.mktemp("sharded") / "synthetic"
    prepare("synthetic", out, num_notes=61, seed=0, top_t=4)  # an odd note count: uneven shards
    return str(out)


@pytest.mark.parametrize("feature_cache", ["auto"])  # the pixel path shards the same rows
def test_two_gloo_ranks_give_the_metrics_of_one(prepared, tmp_path, feature_cache):
    single = _metrics(0, 1, prepared, feature_cache)
    run_on_gloo_ranks(_worker, 2, prepared, feature_cache, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert single["num_queries"] > 0 and len(single) > 10
    for metrics in ranks:
        assert metrics == pytest.approx(single, abs=1e-6)


def test_sharding_without_the_process_group_is_refused(prepared):
    cfg = _cfg(prepared, "off")
    model, _ = build_model(cfg.model, cfg.loss, seed=0)
    with pytest.raises(ValueError, match="rank 1 of 2 needs that process group"):
        validation_recall(model, prepared, cfg, "cpu", rank=1, world=2)
