"""A catalogue's related-note index: embeddings file, FAISS index, manifest, top-k search.

`rayjobs.embed` writes an index directory; `rayjobs.serve` and `rayjobs.browse` read it:

    OUT/embeddings.parquet   note_id int64, embedding fixed_size_list<float32>[d] (one row per note,
                             sorted by note_id; row i is FAISS id i)
    OUT/index.faiss          inner-product FAISS index (`exact` flat, `hnsw` or `ivf`)
    OUT/manifest.json        Manifest: export path and hash, dim, normalisation, index kind, count, created
    OUT/shards/              the resumable job's per-shard parts (kept: a rerun skips them)

    emb = finalize_embeddings(raw, dim=16)                  # first `dim` dims, L2-normalised
    index = build_index(emb, "exact")
    related = search(index, ids, emb[[3]], k=10, exclude=ids[[3]])   # [[(note_id, score), ...]]
    write_index_dir(out, ids, emb, export=..., export_hash=..., index_kind="exact")
    catalog = load_index_dir("runs/index/smoke")            # .ids, .embeddings, .index, .manifest

Embeddings are L2-normalised after truncation (`normalisation: "l2"`), so inner product is cosine
similarity, the evaluation's geometry (core.evaluation). No Ray here; FAISS is imported lazily
(an optional dependency: the `faiss` extra).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDINGS_FILE = "embeddings.parquet"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
INDEX_KINDS = ("exact", "hnsw", "ivf")
NORMALISATION = "l2"


class IndexDirError(FileNotFoundError):
    """An index directory is missing or incomplete; the message says which command writes it."""


@dataclass
class Manifest:
    """What an index directory holds and which model wrote it (OUT/manifest.json)."""

    export: str
    """Path of the model export the embeddings came from."""
    export_hash: str
    """sha256 over the export's weights and config (`export_hash`): the service refuses another model."""
    dim: int
    """Embedding width after truncation."""
    normalisation: str
    """`l2`: every embedding has unit norm (inner product = cosine)."""
    index: str
    """FAISS index kind, one of INDEX_KINDS."""
    count: int
    """Number of notes (rows of embeddings.parquet, vectors in the index)."""
    created: str
    """UTC ISO-8601 time the manifest was written."""
    data: str = ""
    """Prepared data directory the notes came from."""

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, path: str | os.PathLike) -> None:
        _atomic_write_text(Path(path), json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def export_hash(export_dir: str | os.PathLike) -> str:
    """sha256 of the export's weights and config files (what decides its embeddings)."""
    from core.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = Path(export_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {export_dir} is not a complete NoteLLM-2 export")
        digest.update(name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def finalize_embeddings(raw: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Model embeddings float [N, d] -> the index's float32 [N, dim]: first `dim` dims, L2-normalised.

    Raises:
        ValueError: `dim` is not in 1..d.
    """
    x = np.asarray(raw, dtype=np.float32)
    if dim is not None:
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"dim {dim}: the model's embeddings have {x.shape[1]} dimensions; allowed 1..{x.shape[1]}")
        x = x[:, :dim]
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [N, 1]
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def embeddings_table(note_ids: np.ndarray, embeddings: np.ndarray):
    """pyarrow Table: note_id int64, embedding fixed_size_list<float32>[d]."""
    import pyarrow as pa

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)  # [N, d]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    return pa.table({"note_id": pa.array(np.asarray(note_ids, dtype=np.int64), pa.int64()), "embedding": column})


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(note_ids int64 [N], embeddings float32 [N, d]) of an embeddings Parquet file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = table["note_id"].to_numpy().astype(np.int64)
    column = table["embedding"].combine_chunks()
    width = column.type.list_size if hasattr(column.type, "list_size") else None
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if width is None:  # variable-size lists (rayjobs.evaluate's file): every row has the same width
        width = len(flat) // max(1, len(ids))
    return ids, flat.reshape(len(ids), width)


def _faiss():
    from core.metrics import _import_faiss

    return _import_faiss()


def build_index(embeddings: np.ndarray, kind: str = "exact"):
    """An inner-product FAISS index over float32 [N, d]; row i gets FAISS id i."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: allowed {', '.join(INDEX_KINDS)}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if kind == "exact":
        index = _faiss().IndexFlatIP(x.shape[1])
        index.add(x)
        return index
    from core.metrics import build_faiss_index

    return build_faiss_index(x, kind)


def write_index(index, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _faiss().write_index(index, str(tmp))
    tmp.replace(path)


def search(index, note_ids: np.ndarray, queries: np.ndarray, k: int, exclude=None) -> list[list[tuple[int, float]]]:
    """Top-k (note_id, score) of each query, best first, without the note in `exclude` (per query).

    Args:
        index: FAISS index whose id i is `note_ids[i]`.
        note_ids: int64 [N].
        queries: float32 [Q, d], finalised like the index's vectors.
        k: results per query.
        exclude: None, or int64 [Q]: a note id to leave out of each query's results (the query itself).
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # [Q, d]
    extra = 0 if exclude is None else 1
    want = min(k + extra, index.ntotal)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(int(index.hnsw.efSearch), 2 * want)
    scores, rows = index.search(q, want)  # [Q, want], [Q, want]; row -1 = no result
    out = []
    for i in range(len(q)):
        keep = []
        for score, row in zip(scores[i], rows[i]):
            if row < 0:
                continue
            nid = int(note_ids[row])
            if exclude is not None and nid == int(exclude[i]):
                continue
            keep.append((nid, float(score)))
        out.append(keep[:k])
    return out


def write_index_dir(out: str | os.PathLike, note_ids: np.ndarray, embeddings: np.ndarray, *, export: str,
                    export_hash: str, index_kind: str = "exact", data: str = "") -> Manifest:
    """Write embeddings.parquet, index.faiss and, last, manifest.json for finalised embeddings.

    Args:
        out: index directory (created).
        note_ids: int64 [N], sorted.
        embeddings: float32 [N, dim], finalised (`finalize_embeddings`).
        export, export_hash: the model export they came from.
        index_kind: one of INDEX_KINDS.
        data: the prepared data directory of the notes.
    """
    import datetime

    from core.data.schema import write_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(embeddings_table(note_ids, embeddings), out / EMBEDDINGS_FILE)
    write_index(build_index(embeddings, index_kind), out / INDEX_FILE)
    manifest = Manifest(export=export, export_hash=export_hash, dim=int(embeddings.shape[1]), normalisation=NORMALISATION,
                        index=index_kind, count=int(len(note_ids)),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), data=data)
    manifest.write(out / MANIFEST_FILE)
    return manifest


@dataclass
class IndexDir:
    """An index directory loaded into memory."""

    root: Path
    manifest: Manifest
    ids: np.ndarray
    """int64 [N], sorted."""
    embeddings: np.ndarray
    """float32 [N, dim]."""
    index: object

    def rows_of(self, note_ids) -> np.ndarray:
        """Row of each id, -1 where the id is not in the index."""
        ids = np.asarray(note_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        return np.where((len(self.ids) > 0) & (self.ids[pos] == ids), pos, -1)

    def related(self, note_ids, k: int) -> list[list[tuple[int, float]]]:
        """Top-k related notes of notes already in the index (each note itself excluded)."""
        rows = self.rows_of(note_ids)
        if (rows < 0).any():
            raise KeyError(f"note id {int(np.asarray(note_ids)[rows < 0][0])} is not in the index")
        return search(self.index, self.ids, self.embeddings[rows], k, exclude=np.asarray(note_ids, dtype=np.int64))


def load_index_dir(root: str | os.PathLike) -> IndexDir:
    """Read OUT/manifest.json, embeddings.parquet and index.faiss (all must exist).

    Raises:
        IndexDirError: a file is missing (one line naming it and the command that writes it).
    """
    root = Path(root)
    for name in (MANIFEST_FILE, EMBEDDINGS_FILE, INDEX_FILE):
        if not (root / name).exists():
            raise IndexDirError(f"{root / name} not found: build the index with python -m rayjobs.embed --out {root}")
    manifest = Manifest.read(root / MANIFEST_FILE)
    ids, emb = read_embeddings(root / EMBEDDINGS_FILE)
    index = _faiss().read_index(str(root / INDEX_FILE))
    if not (len(ids) == index.ntotal == manifest.count):
        raise IndexDirError(f"{root}: {len(ids)} embeddings, {index.ntotal} index vectors and manifest count "
                            f"{manifest.count} disagree; rebuild with python -m rayjobs.embed --out {root}")
    return IndexDir(root=root, manifest=manifest, ids=ids, embeddings=emb, index=index)
