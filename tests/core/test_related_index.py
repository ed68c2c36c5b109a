"""core.related_index: finalisation, the embeddings file, FAISS kinds against brute force, the directory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core.related_index import (
    IndexDirError,
    build_index,
    embeddings_table,
    finalize_embeddings,
    load_index_dir,
    read_embeddings,
    search,
    write_index_dir,
)


def _emb(n=200, d=12, seed=0):
    return finalize_embeddings(np.random.default_rng(seed).normal(size=(n, d)))


def test_finalize_truncates_then_normalises():
    raw = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(finalize_embeddings(raw, 2), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(finalize_embeddings(raw)[0], np.array([3, 4, 12]) / 13, rtol=1e-6)
    with pytest.raises(ValueError, match="allowed 1..3"):
        finalize_embeddings(raw, 4)


def test_embeddings_table_round_trip(tmp_path):
    import pyarrow.parquet as pq

    emb = _emb(5, 4)
    pq.write_table(embeddings_table(np.arange(5) * 7, emb), tmp_path / "e.parquet")
    assert pq.read_schema(tmp_path / "e.parquet").field("embedding").type == pa.list_(pa.float32(), 4)
    ids, back = read_embeddings(tmp_path / "e.parquet")
    np.testing.assert_array_equal(ids, np.arange(5) * 7)
    np.testing.assert_array_equal(back, emb)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_search_matches_brute_force_and_excludes_the_query(kind):
    emb = _emb()
    ids = np.arange(200, dtype=np.int64) + 1000
    index = build_index(emb, kind)
    if kind == "ivf":
        index.nprobe = index.nlist  # every cell probed: exact
    got = search(index, ids, emb[:10], k=5, exclude=ids[:10])
    scores = emb @ emb[:10].T  # [N, 10]
    for j in range(10):
        s = scores[:, j].copy()
        s[j] = -np.inf
        best = np.argsort(-s, kind="stable")[:5]
        assert [nid for nid, _ in got[j]] == ids[best].tolist()
        np.testing.assert_allclose([sc for _, sc in got[j]], s[best], rtol=1e-5)


def test_index_dir_round_trip_and_missing_files(tmp_path):
    emb = _emb(30, 6)
    ids = np.arange(30, dtype=np.int64) * 3
    write_index_dir(tmp_path / "idx", ids, emb, export="/x", export_hash="abc", index_kind="exact")
    catalog = load_index_dir(tmp_path / "idx")
    assert catalog.manifest.count == 30 and catalog.manifest.dim == 6 and catalog.manifest.normalisation == "l2"
    np.testing.assert_array_equal(catalog.rows_of([0, 3, 4, 87]), [0, 1, -1, 29])
    assert 3 not in [nid for nid, _ in catalog.related([3], k=29)[0]] and len(catalog.related([3], k=29)[0]) == 29
    with pytest.raises(KeyError, match="note id 4"):
        catalog.related([4], k=3)
    with pytest.raises(IndexDirError, match="python -m rayjobs.embed"):
        load_index_dir(tmp_path / "nothing")
