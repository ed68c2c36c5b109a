"""The evaluation protocol on hand-made cases; the in-process embedding path with the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.evaluation import build_protocol, evaluate_embeddings, flatten_metrics, k_label, markdown_table


def hand_pairs() -> pd.DataFrame:
    # 4 deduplicated pairs; queries 1..4, targets 11..14; 20 is a test note in no pair of interest.
    return pd.DataFrame({
        "query_id": [1, 2, 3, 4],
        "target_id": [11, 12, 13, 14],
        "score": [1.0, 1.0, 1.0, 1.0],
        "short_query": [True, False, True, False],
        "short_target": [False, False, True, True],
    })


def hand_embeddings():
    """2-D embeddings on the unit circle: angle decides the dot product, so ranks are easy to read.

    Pool = {11, 12, 13, 14} (test notes minus queries). Each query sits at its target's angle
    except query 2, which sits nearer 13 than its target 12 (rank 1), and query 4,
    which is opposite its target (rank 3, last in a pool of 4).
    """
    angles = {11: 0.0, 12: 1.0, 13: 2.0, 14: 3.0, 1: 0.0, 2: 1.8, 3: 2.0, 4: 3.0 + np.pi}
    ids = np.array(sorted(angles))
    emb = np.stack([[np.cos(angles[i]), np.sin(angles[i])] for i in ids]).astype(np.float32)
    return ids, emb


def test_protocol_pools():
    p = build_protocol(hand_pairs(), pool="targets")  # reduced: the pairs' targets
    assert p.pool_ids.tolist() == [11, 12, 13, 14]
    assert p.query_ids.tolist() == [1, 2, 3, 4]
    assert p.needed_ids().tolist() == [1, 2, 3, 4, 11, 12, 13, 14]
    assert p.subsets["short_query"].pool_ids.tolist() == [11, 12, 13, 14]  # one shared pool
    catalog = [1, 2, 3, 4, 11, 12, 13, 14, 20, 21]
    big = build_protocol(hand_pairs(), pool="catalog", all_note_ids=catalog)
    assert big.pool_ids.tolist() == [11, 12, 13, 14, 20, 21]
    # each subset's pool is the catalogue minus *its own* queries: short_query = queries 1 and 3
    assert big.subsets["short_query"].pool_ids.tolist() == [2, 4, 11, 12, 13, 14, 20, 21]
    assert build_protocol(hand_pairs(), pool="targets", max_queries=2).pool_ids.tolist() == [11, 12]
    with pytest.raises(ValueError, match="all_note_ids"):
        build_protocol(hand_pairs(), pool="catalog")
    with pytest.raises(ValueError, match="allowed catalog, official, targets"):
        build_protocol(hand_pairs(), pool="test")


def test_official_pool_dedupes_and_pools_each_subset_on_its_own():
    """REFERENCE §7: each subset's pair file is deduplicated on its own and pooled on its own, over
    the held-out split's notes. Here 1->11 (score 3) wins the all-pairs dedupe over 2->11, but the
    short-query subset (queries 2, 3) keeps 2->11 since query 1 is not in it."""
    pairs = pd.DataFrame({"query_id": [1, 2, 3, 3], "target_id": [11, 11, 12, 13], "score": [3.0, 2.0, 1.0, 0.5],
                          "short_query": [False, True, True, True], "short_target": [False, False, True, False]})
    p = build_protocol(pairs, pool="official")
    assert list(zip(p.query_ids, p.target_ids)) == [(1, 11), (3, 12)]
    assert p.pool_ids.tolist() == [2, 11, 12, 13]  # split notes {1, 2, 3, 11, 12, 13} minus queries {1, 3}
    sq = p.subsets["short_query"]
    assert list(zip(sq.query_ids, sq.target_ids)) == [(2, 11), (3, 12)]
    assert sq.pool_ids.tolist() == [1, 11, 12, 13]
    st = p.subsets["short_target"]
    assert list(zip(st.query_ids, st.target_ids)) == [(3, 12)] and st.pool_ids.tolist() == [1, 2, 11, 12, 13]
    # dedupe leaves no target that is also a query of its subset
    for sub in p.subsets.values():
        assert not np.isin(sub.target_ids, sub.query_ids).any()


def test_protocol_dedupe_removes_pairs_whose_target_is_a_query():
    pairs = pd.DataFrame({"query_id": [1, 2], "target_id": [2, 3], "short_query": [False, False], "short_target": [False, True]})
    p = build_protocol(pairs, pool="targets")
    assert p.query_ids.tolist() == [1] and p.target_ids.tolist() == [2]  # note 2 is used once only
    assert p.dropped_pairs == 0 and p.subsets["short_target"].num_queries == 0  # its one pair lost the dedupe


def test_three_subsets_on_hand_made_case():
    ids, emb = hand_embeddings()
    metrics, per_query = evaluate_embeddings(ids, emb, build_protocol(hand_pairs(), pool="targets"), ks=[1, 2, 4, 100])
    everyone = per_query[per_query["subset"] == "all"]
    assert everyone.set_index("query_id")["rank"].to_dict() == {1: 0, 2: 1, 3: 0, 4: 3}
    assert metrics["all"] == {"R@1": 0.5, "R@2": 0.75, "R@4": 1.0, "R@100": None}
    # short_query = queries 1 and 3 (ranks 0, 0); short_target = queries 3 and 4 (ranks 0, 3)
    assert metrics["short_query"] == {"R@1": 1.0, "R@2": 1.0, "R@4": 1.0, "R@100": None}
    assert metrics["short_target"] == {"R@1": 0.5, "R@2": 0.5, "R@4": 1.0, "R@100": None}
    assert metrics["num_queries"] == 4 and metrics["pool_size"] == 4
    assert metrics["num"] == {"all": 4, "short_query": 2, "short_target": 2}
    assert flatten_metrics(metrics)["short_target/R@2"] == 0.5
    assert "all/R@100" not in flatten_metrics(metrics)
    assert list(per_query.columns) == ["subset", "query_id", "target_id", "rank", "tied"]
    assert len(per_query) == 4 + 2 + 2 and metrics["pool"] == "targets" and metrics["ties"] == "expected"
    lo, hi = metrics["ci95"]["all"]["R@2"]
    assert lo <= 0.75 <= hi and lo < hi and metrics["ci95"]["all"]["R@100"] is None


def test_faiss_index_path_matches_exact_on_hand_made_case():
    pytest.importorskip("faiss")
    ids, emb = hand_embeddings()
    exact, _ = evaluate_embeddings(ids, emb, build_protocol(hand_pairs(), pool="targets"), ks=[1, 2, 4])
    for kind in ("hnsw", "ivf"):
        approx, per_query = evaluate_embeddings(ids, emb, build_protocol(hand_pairs(), pool="targets"), ks=[1, 2, 4], index=kind)
        assert approx["all"] == exact["all"] and approx["short_query"] == exact["short_query"]
        assert per_query["rank"].max() <= 4
        # the index's cost against exact is reported with the figures (here: none)
        check = approx["approx_check"]
        assert check["queries"] == exact["num_queries"] and check["exact"] == exact["all"]
        assert check["recall_loss"] == {k: 0.0 for k in exact["all"]}
    assert "approx_check" not in exact


def test_approx_check_reports_what_a_coarse_index_loses():
    """An IVF index probing 1 of 16 lists on unclustered data misses targets: the report's
    recall_loss is exact minus approximate recall, on a sample of the queries."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    n = 600
    emb = torch.tensor(rng.normal(size=(n, 16)), dtype=torch.float32)
    pairs = pd.DataFrame({"query_id": np.arange(0, 200), "target_id": np.arange(200, 400),
                          "short_query": False, "short_target": False})
    ids = np.arange(n)
    metrics, _ = evaluate_embeddings(ids, emb, build_protocol(pairs, pool="catalog", all_note_ids=ids), ks=[10, 100],
                                     index="ivf", nlist=16, nprobe=1, exact_check_queries=150)
    check = metrics["approx_check"]
    assert check["queries"] == 150
    for k in ("R@10", "R@100"):
        assert check["recall_loss"][k] == pytest.approx(check["exact"][k] - check["approximate"][k])
    assert check["recall_loss"]["R@100"] > 0.05, check


def test_embeddings_are_normalised_and_order_free():
    ids, emb = hand_embeddings()
    perm = np.random.default_rng(0).permutation(len(ids))
    scaled = emb * np.linspace(1, 50, len(ids))[:, None].astype(np.float32)  # norms must not matter
    m1, _ = evaluate_embeddings(ids, emb, build_protocol(hand_pairs(), pool="targets"), ks=[1, 2])
    m2, _ = evaluate_embeddings(ids[perm], scaled[perm], build_protocol(hand_pairs(), pool="targets"), ks=[1, 2])
    assert m1 == m2


def test_missing_embedding_is_a_clear_error():
    ids, emb = hand_embeddings()
    with pytest.raises(KeyError, match="no embedding"):
        evaluate_embeddings(ids[1:], emb[1:], build_protocol(hand_pairs(), pool="targets"), ks=[1])


def test_markdown_table_shape():
    ids, emb = hand_embeddings()
    metrics, _ = evaluate_embeddings(ids, emb, build_protocol(hand_pairs(), pool="targets"), ks=[1, 1000])
    table = markdown_table({"both": metrics, "text": metrics})
    lines = table.strip().splitlines()
    assert lines[0] == ("| model | all R@1 | all R@1k | short_query R@1 | short_query R@1k | "
                        "short_target R@1 | short_target R@1k | queries | pool |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "both" and cells[1].startswith("50.0 (") and cells[2] == "n/a"  # value (95 % interval)
    assert cells[3].startswith("100.0") and cells[5].startswith("50.0 (") and cells[-2:] == ["4", "4 (targets)"]
    assert len(lines) == 4
    assert [k_label(k) for k in (10, 100, 1000, 10000, 10**6)] == ["10", "100", "1k", "10k", "1M"]


# ---------------------------------------------------------------------------------------------
# With the real tiny model and a synthetic prepared dataset (need core.model / core.data)
# ---------------------------------------------------------------------------------------------


def tiny_eval_setup(root, num_notes: int = 120):
    """A synthetic prepared corpus, a tiny random-init model, its export and run-config YAML.

    Returns a namespace: model, tokenizer, cfg (RunConfig), data_dir, export_dir, config_path.
    """
    from types import SimpleNamespace

    from core.checkpoint import save_export
    from core.config import DataConfig, EvalConfig, ModelConfig, RunConfig, dump_run_config
    from core.data.prepare import prepare
    from core.model.builders import build_model
    from tests.conftest import tiny_model_dict

    data_dir = root / "data"
    prepare("synthetic", data_dir, num_notes=num_notes, seed=0)
    cfg = RunConfig(model=ModelConfig(**tiny_model_dict()), data=DataConfig(path=str(data_dir), num_notes=num_notes),
                    eval=EvalConfig(ks=[1, 5, 10, 100_000], batch_size=8, chunk_size=16))
    model, tokenizer = build_model(cfg.model, cfg.loss, seed=0)
    model.eval()
    export_dir = save_export(model, tokenizer, cfg, root / "export")
    config_path = root / "tiny.yaml"
    dump_run_config(cfg, config_path)
    return SimpleNamespace(model=model, tokenizer=tokenizer, cfg=cfg, data_dir=str(data_dir), export_dir=str(export_dir),
                           config_path=str(config_path))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_eval_setup(tmp_path_factory.mktemp("eval"))


def test_validation_recall_runs_and_modalities_differ(tiny_run):
    from core.evaluation import validation_recall

    cfg = tiny_run.cfg
    results = {m: validation_recall(tiny_run.model, tiny_run.data_dir, cfg, "cpu", modality=m, return_per_query=True)
               for m in ("both", "image", "text")}
    metrics, per_query = results["both"]
    assert set(metrics) >= {"all", "short_query", "short_target", "num_queries", "pool_size", "num", "ci95"}
    assert metrics["split"] == "val" and metrics["pool"] == "catalog"
    assert metrics["pool_size"] == cfg.data.num_notes - metrics["num_queries"]  # catalogue minus queries
    assert metrics["num_queries"] == int((per_query["subset"] == "all").sum()) > 0
    assert metrics["all"]["R@100000"] is None  # K beyond the pool: not applicable
    for subset in ("all", "short_query", "short_target"):
        assert set(metrics[subset]) == {f"R@{k}" for k in cfg.eval.ks}
    assert 0 < metrics["num"]["short_query"] < metrics["num_queries"]
    # The ablations change the note embeddings, hence the ranks.
    ranks = {m: r[1].loc[r[1]["subset"] == "all", "rank"].to_numpy() for m, r in results.items()}
    assert not np.array_equal(ranks["both"], ranks["image"])
    assert not np.array_equal(ranks["both"], ranks["text"])
    few = validation_recall(tiny_run.model, tiny_run.data_dir, cfg, "cpu", max_queries=5)
    assert few["num_queries"] == 5
    test = validation_recall(tiny_run.model, tiny_run.data_dir, cfg, "cpu", split="test", return_per_query=True)
    assert test[0]["split"] == "test"
    # validation and test query notes are disjoint
    assert not set(test[1]["query_id"]) & set(per_query["query_id"])


def test_image_modality_is_refused_for_a_model_that_reads_no_image(tiny_run):
    import dataclasses

    from core.evaluation import check_modality, validation_recall

    text_model = dataclasses.replace(tiny_run.cfg.model, prompt_mode="text", late_fusion=False)
    check_modality(text_model, "text")
    check_modality(dataclasses.replace(text_model, late_fusion=True), "image")  # late fusion reads pixels
    cfg = dataclasses.replace(tiny_run.cfg, model=text_model)
    with pytest.raises(ValueError, match="modality 'image' needs a model that reads images"):
        validation_recall(tiny_run.model, tiny_run.data_dir, cfg, "cpu", modality="image")


def test_identical_embeddings_warn_that_recall_is_meaningless(caplog):
    pairs = hand_pairs()
    protocol = build_protocol(pairs, pool="targets")
    ids = np.array([1, 2, 3, 4, 11, 12, 13, 14])
    with caplog.at_level("WARNING"):
        metrics, _ = evaluate_embeddings(ids, np.ones((8, 4), np.float32), protocol, [1])
    assert metrics["all"]["R@1"] == pytest.approx(1 / 4)  # every candidate ties: chance, K / |pool|
    assert metrics["tied_fraction"] == 1.0
    assert "all 8 embeddings are identical" in caplog.text
