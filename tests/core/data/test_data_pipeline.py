"""The streaming pipeline: local batches, Ray Data notes, and pairs through a 2-worker TorchTrainer."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.config import RunConfig
from core.data.pipeline import iter_pair_batches_local, note_dataset, pair_dataset
from core.prompts import prompt_length_bound
from core.step import pair_batch_to_notes
from tests.conftest import tiny_model_dict


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from core.data.prepare import prepare

    out = tmp_path_factory.mktemp("synthetic")
    prepare("synthetic", out, num_notes=60, seed=0, top_t=4)
    return out


def run_cfg(pair_join="auto", **model):
    return RunConfig.from_dict({"model": tiny_model_dict(**model), "data": {"preprocess_actors": 1, "pair_join": pair_join}})


def token_width(cfg):
    from core.model.builders import build_tokenizer

    return prompt_length_bound(build_tokenizer(cfg.model), cfg.model)


def test_local_batches_layout(prepared):
    cfg = run_cfg()
    batches = list(iter_pair_batches_local(prepared, "train", cfg, batch_size=4, seed=0))
    n_pairs = pq.read_table(prepared / "pairs_train.parquet").num_rows
    assert len(batches) == n_pairs // 4
    b = batches[0]
    T = token_width(cfg)
    assert b["q_input_ids"].shape == (4, T) and b["q_input_ids"].dtype == torch.int64
    assert b["t_pixel_values"].shape == (4, 3, 32, 32) and b["t_pixel_values"].dtype == torch.uint8
    assert b["q_has_image"].dtype == torch.bool and bool(b["q_has_image"].all())
    notes = pair_batch_to_notes(b)
    assert notes["note_id"].tolist() == b["q_note_id"].tolist() + b["t_note_id"].tolist()
    again = next(iter_pair_batches_local(prepared, "train", cfg, batch_size=4, seed=0))
    assert torch.equal(again["q_note_id"], b["q_note_id"])


def test_text_only_model_has_no_pixel_columns(prepared):
    b = next(iter_pair_batches_local(prepared, "test", run_cfg(prompt_mode="text", late_fusion=False), batch_size=2))
    assert not any("pixel" in k or "has_image" in k for k in b)


def test_note_dataset_on_ray(ray_local, prepared):
    cfg = run_cfg()
    rows = note_dataset(prepared, cfg, note_ids=[0, 5, 7]).take_all()
    assert sorted(r["note_id"] for r in rows) == [0, 5, 7]
    r = rows[0]
    assert r["pixel_values"].shape == (3, 32, 32) and r["pixel_values"].dtype == np.uint8
    assert r["input_ids"].shape == (token_width(cfg),) and r["has_image"]
    assert r["text_chars"] >= 0


def test_pair_dataset_through_torch_trainer(ray_local, prepared, tmp_path):
    import json

    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = run_cfg()
    T = token_width(cfg)
    n_pairs = pq.read_table(prepared / "pairs_train.parquet").num_rows

    def train_fn_per_worker(config):
        shard = ray.train.get_dataset_shard("train")
        seen, shapes_ok = 0, True
        for batch in shard.iter_torch_batches(batch_size=4, drop_last=True):
            notes = pair_batch_to_notes(batch)
            shapes_ok &= batch["q_input_ids"].shape == (4, config["T"]) and batch["t_pixel_values"].shape == (4, 3, 32, 32)
            shapes_ok &= notes["input_ids"].shape[0] == 8 and batch["q_has_image"].dtype == torch.bool
            seen += int(batch["q_note_id"].shape[0])
        rank = ray.train.get_context().get_world_rank()
        # a file per rank: the test reads every worker's view, not only rank 0's reported metrics
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump({"pairs_seen": seen, "shapes_ok": bool(shapes_ok)}, f)

    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config={"T": T, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": pair_dataset(prepared, "train", cfg)},
    )
    result = trainer.fit()
    assert result.error is None
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["shapes_ok"] for s in seen)
    assert all(s["pairs_seen"] > 0 for s in seen)  # both workers got a shard
    assert sum(s["pairs_seen"] for s in seen) > n_pairs - 2 * 4 * 2  # drop_last loses < a batch per worker and block


def _rows_by_pair(rows) -> dict:
    return {(int(r["q_note_id"]), int(r["t_note_id"])): r for r in rows}


def test_broadcast_and_shuffle_joins_give_the_same_pairs(ray_local, prepared):
    from core.data.pipeline import pair_join_mode

    assert pair_join_mode(str(prepared / "notes.parquet"), "auto") == "broadcast"  # a small file
    pairs = pq.read_table(prepared / "pairs_test.parquet")
    expected = set(zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist()))
    broadcast = pair_dataset(prepared, "test", run_cfg("broadcast")).take_all()
    shuffle = _rows_by_pair(pair_dataset(prepared, "test", run_cfg("shuffle")).take_all())
    assert [(int(r["q_note_id"]), int(r["t_note_id"])) for r in broadcast] == list(zip(
        pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist()))  # file order, every pair
    assert set(shuffle) == expected
    for row in broadcast:
        other = shuffle[(int(row["q_note_id"]), int(row["t_note_id"]))]
        assert set(row) == set(other)
        for key in row:
            np.testing.assert_array_equal(row[key], other[key], err_msg=key)


def test_broadcast_join_drops_and_counts_pairs_with_unknown_notes(prepared, caplog):
    import dataclasses

    import pyarrow as pa

    from core.data.pipeline import PairPreprocessor, _note_columns

    cfg = run_cfg("broadcast")
    prep = PairPreprocessor(dataclasses.asdict(cfg.model), str(prepared / "notes.parquet"), _note_columns(cfg.model))
    batch = pa.table({"query_id": pa.array([0, 999_999, 1], pa.int64()), "target_id": pa.array([1, 2, 999_998], pa.int64())})
    with caplog.at_level("WARNING"):
        out = prep(batch)
    assert out["q_note_id"].tolist() == [0] and out["t_note_id"].tolist() == [1]
    assert prep.missing == 2 and "2 pair(s) so far reference note ids not in the file" in caplog.text


def test_prepared_train_pairs_are_not_grouped_by_query(prepared):
    q = pq.read_table(prepared / "pairs_train.parquet")["query_id"].to_numpy()
    assert len(q) > 20 and not np.all(np.diff(q) >= 0)
