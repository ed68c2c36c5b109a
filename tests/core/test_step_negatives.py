"""Hard negatives through the batch layout: the pipeline's `n_` slots (local and Ray Data), the step's
wiring into the loss, and GradCache with negatives equal to the plain step."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import LossConfig, ModelConfig, RunConfig
from core.data.pipeline import iter_pair_batches_local, pair_dataset
from core.losses import micl_loss, pair_contrastive_loss
from core.model.builders import build_model
from core.step import forward_pair_batch, pair_batch_to_notes
from tests.conftest import tiny_model_dict
from tests.core.test_grad_cache import assert_same_grads, step_grads

K = 2


@pytest.fixture(scope="module")
def negative_data(tmp_path_factory):
    """A prepared corpus whose training pairs carry `negative_ids`: K random other notes each, every
    third pair one short, every fifth none, and one id that is not a note (it must become an empty slot)."""
    from core.data.prepare import prepare

    base = tmp_path_factory.mktemp("hn")
    prepare("synthetic", str(base / "plain"), num_notes=40, seed=0)
    shutil.copytree(base / "plain", base / "mined")
    path = base / "mined" / "pairs_train.parquet"
    pairs = pq.read_table(path)
    ids = pq.read_table(base / "mined" / "notes.parquet", columns=["note_id"])["note_id"].to_numpy()
    rng = np.random.default_rng(0)
    lists = []
    for p, (q, t) in enumerate(zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist())):
        pick = rng.choice(ids[(ids != q) & (ids != t)], K + 1, replace=False).tolist()
        lists.append([] if p % 5 == 0 else pick[:K - 1] if p % 3 == 0 else pick[:K])
    lists[1] = [lists[1][0], 999_999]  # not in notes.parquet
    pq.write_table(pairs.append_column("negative_ids", pa.array(lists, pa.list_(pa.int64()))), path)
    return base / "mined", lists


def cfg(**model_over) -> RunConfig:
    return RunConfig.from_dict({"model": tiny_model_dict(**model_over), "data": {"hard_negatives": K}})


def first_batch(data_dir, **model_over):
    return next(iter(iter_pair_batches_local(str(data_dir), "train", cfg(**model_over), 6, seed=0)))


def test_local_batches_carry_each_pairs_negatives_in_k_slots(negative_data):
    data_dir, lists = negative_data
    pairs = pq.read_table(data_dir / "pairs_train.parquet")
    by_pair = {}
    for (q, t), negs in zip(zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist()), lists):
        by_pair.setdefault((q, t), negs)
    batch = first_batch(data_dir)
    assert batch["n_input_ids"].shape[:2] == (6, K) and batch["n_pixel_values"].shape[:2] == (6, K)
    for i in range(6):
        negs = by_pair[(int(batch["q_note_id"][i]), int(batch["t_note_id"][i]))]
        valid = batch["n_valid"][i].tolist()
        assert valid == [j < len(negs) and negs[j] != 999_999 for j in range(K)]
        for j in range(K):
            want = negs[j] if valid[j] else int(batch["q_note_id"][i])  # empty slots hold the query note
            assert int(batch["n_note_id"][i, j]) == want
    # a negative's tokens are those of its note on the query side of some pair (same preprocessing)
    all_batches = list(iter_pair_batches_local(str(data_dir), "train", cfg(), 6, seed=0))
    tokens = {int(i): ids for b in all_batches for i, ids in zip(b["q_note_id"], b["q_input_ids"])}
    checked = 0
    for b in all_batches:
        for i, j in zip(*torch.nonzero(b["n_valid"], as_tuple=True)):
            nid = int(b["n_note_id"][i, j])
            if nid in tokens:
                assert torch.equal(b["n_input_ids"][i, j], tokens[nid])
                checked += 1
    assert checked > 5


def test_ray_data_batches_equal_the_local_ones(ray_local, negative_data):
    data_dir, _ = negative_data
    local = {(int(b["q_note_id"][0]), int(b["t_note_id"][0])): {k: v[0] for k, v in b.items()}
             for b in iter_pair_batches_local(str(data_dir), "train", cfg(), 1, seed=0)}  # one pair a batch
    rows = pair_dataset(str(data_dir), "train", cfg()).take_all()
    assert len(rows) == len(local) and {"n_valid", "n_note_id", "n_input_ids", "n_pixel_values"} <= set(rows[0])
    for row in rows:
        want = local[(int(row["q_note_id"]), int(row["t_note_id"]))]
        for key in want:
            np.testing.assert_array_equal(np.asarray(row[key]), want[key].numpy(), err_msg=key)


def test_step_feeds_the_negatives_to_both_losses_as_candidates(negative_data):
    """forward_pair_batch == the loss computed by hand from the model's embeddings of the three sides."""
    data_dir, _ = negative_data
    batch = first_batch(data_dir)
    loss_cfg = LossConfig()
    model, _ = build_model(ModelConfig(**tiny_model_dict()), loss_cfg, seed=0)
    model.eval()
    with torch.no_grad():
        loss, metrics = forward_pair_batch(model, batch, loss_cfg, "cpu")
        notes = pair_batch_to_notes(batch)
        assert notes["num_negatives"] == 6 * K and notes["note_id"].shape[0] == 6 * (2 + K)
        out = model(input_ids=notes["input_ids"], attention_mask=notes["attention_mask"],
                    pixel_values=notes["pixel_values"], has_image=notes["has_image"])
        ids = torch.cat([batch["q_note_id"], batch["t_note_id"]])
        neg_ids = torch.where(batch["n_valid"], batch["n_note_id"], -1).reshape(-1)
        by_hand = [pair_contrastive_loss(e[:12], out.log_scale, ids, negatives=e[12:], negative_ids=neg_ids)
                   for e in (out.visual, out.multimodal)]
        without = forward_pair_batch(model, {k: v for k, v in batch.items() if not k.startswith("n_")}, loss_cfg, "cpu")[0]
    assert float(metrics["loss_v"]) == pytest.approx(float(by_hand[0]), rel=1e-6)
    assert float(metrics["loss_m"]) == pytest.approx(float(by_hand[1]), rel=1e-6)
    assert float(loss) == pytest.approx(float(micl_loss(*by_hand, loss_cfg.alpha)), rel=1e-6)
    assert float(loss) > float(without)  # the extra candidates make the task harder


@pytest.mark.parametrize("loss_over", [{}, {"matryoshka_dims": [4, 16]}])
def test_chunked_step_with_negatives_equals_unchunked(negative_data, loss_over):
    batch = first_batch(negative_data[0])
    loss0, _, g0 = step_grads(batch, LossConfig(**loss_over))
    loss1, _, g1 = step_grads(batch, LossConfig(grad_cache_chunk_size=4, **loss_over))
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert_same_grads(g0, g1)


def test_hard_negatives_refuse_the_shuffle_join_and_data_without_them(negative_data, tmp_path):
    from core.config import ConfigError
    from core.data.negatives import check_negatives
    from core.data.schema import DataError

    with pytest.raises(ConfigError, match="data.pair_join='shuffle' is invalid"):
        RunConfig.from_dict({"data": {"hard_negatives": 2, "pair_join": "shuffle"}})
    check_negatives(negative_data[0] / "pairs_train.parquet", 2)  # has them
    plain = negative_data[0].parent / "plain" / "pairs_train.parquet"
    check_negatives(plain, 0)
    with pytest.raises(DataError, match="rayjobs.mine_negatives"):
        check_negatives(plain, 2)
