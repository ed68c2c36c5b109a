"""Importer for the public Qilin dataset (Xiaohongshu notes + APP-level sessions; THUIR/Qilin).

Expected layout (the Hugging Face release, one folder per config):

    <input>/notes/*.parquet                   note_idx, note_title, note_content, note_type,
                                              taxonomy1_id, taxonomy2_id, taxonomy3_id,
                                              image_path (list<string>), ... (dense counters)
    <input>/recommendation_train/*.parquet    request_idx, session_idx, user_idx,
                                              request_timestamp, recent_clicked_note_idxs,
                                              rec_results, rec_result_details_with_idx
                                              (list<struct<note_idx, click, position, ...>>)

Notes: note_id = note_idx; title/content from note_title/note_content (hashtags in the content
become topics at prompt time, `core.prompts.clean_note_text`); category = "taxonomy1/taxonomy2";
image_uri = the first `image_path` joined onto `image_root` (the image archive is a separate
download; without `image_root` the relative path is kept and unreadable images become
image-less notes during preparation, counted).

Events: the clicked results (`click == 1` in `rec_result_details_with_idx`) of each user,
ordered by (request_timestamp, request_idx, position); consecutive clicks form
(viewed, clicked) events — the app-session reading of "viewed A, then clicked B".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.data.schema import EVENT_SCHEMA, DataError, cast_column, read_table

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus

NOTE_COLUMNS = ["note_idx", "note_title", "note_content", "note_type", "taxonomy1_id", "taxonomy2_id", "image_path"]
REC_COLUMNS = ["request_idx", "session_idx", "user_idx", "request_timestamp", "rec_result_details_with_idx"]


def build_qilin(input: str | None = None, image_root: str | None = None, num_notes: int | None = None,
                seed: int = 0, split: str = "recommendation_train") -> "Corpus":
    """Read Qilin notes and recommendation sessions.

    Args:
        input: the dataset directory (see module docstring). Required.
        image_root: directory or URI prefix the `image_path` entries are relative to.
        num_notes: keep a seeded random subset of notes (events touching others are dropped
            later by validation, counted).
        seed: subset seed.
        split: the sessions folder (`recommendation_train` or `recommendation_test`).
    """
    from core.data.corpora import Corpus
    from core.data.report import DataReport

    if not input:
        raise DataError("qilin: --input DIR is required (the Qilin dataset folder with notes/ and recommendation_train/)")
    root = Path(input)
    report = DataReport()
    raw = read_table(root / "notes", columns=NOTE_COLUMNS)
    for col in ("note_idx", "note_title", "note_content"):
        if col not in raw.column_names:
            raise DataError(f"{root / 'notes'}: Qilin notes need column {col!r} (has {raw.column_names})")
    # before sampling, so a bad value is reported at its row in its file
    raw = raw.set_column(raw.schema.get_field_index("note_idx"), "note_idx",
                         cast_column(raw["note_idx"], pa.int64(), root / "notes", "note_idx"))
    if num_notes is not None and num_notes < raw.num_rows:
        rng = np.random.default_rng(seed)
        report.skip("source", "not_sampled", raw.num_rows - num_notes)
        raw = raw.take(pa.array(np.sort(rng.choice(raw.num_rows, size=num_notes, replace=False))))
    notes = pa.table({
        "note_id": raw["note_idx"],
        "title": raw["note_title"],
        "topics": pa.nulls(raw.num_rows, pa.list_(pa.string())),
        "content": raw["note_content"],
        "image": pa.nulls(raw.num_rows, pa.binary()),
        "image_uri": _image_uris(raw, image_root),
        "category": _category(raw),
        "source_id": raw["note_idx"].cast(pa.string()),
    })
    report.info["qilin"] = {"input": str(root), "image_root": image_root, "video_notes": _count_video(raw)}
    events = read_sessions(root / split)
    return Corpus("qilin", notes, events, report)


def read_sessions(path: Path) -> pa.Table:
    """Recommendation sessions -> consecutive-click events (EVENT_SCHEMA)."""
    rec = read_table(path, columns=REC_COLUMNS)
    for col in ("user_idx", "rec_result_details_with_idx"):
        if col not in rec.column_names:
            raise DataError(f"{path}: Qilin sessions need column {col!r} (has {rec.column_names})")
    details = rec["rec_result_details_with_idx"].combine_chunks()
    flat = pc.list_flatten(details)
    parent = pc.list_parent_indices(details)
    fields = {f.name for f in flat.type}
    if "note_idx" not in fields or "click" not in fields:
        raise DataError(f"{path}: rec_result_details_with_idx items need note_idx and click (has {sorted(fields)})")
    n = len(parent)

    def per_row(name, default, to_type):
        if name not in rec.column_names:
            return pa.array(np.full(n, default)).cast(to_type)
        return pc.take(cast_column(rec[name], to_type, path, name), parent)

    def per_item(name, to_type):
        return cast_column(pc.struct_field(flat, name), to_type, path, f"rec_result_details_with_idx.{name}", rows=parent.to_numpy())

    ts = per_row("request_timestamp", np.nan, pa.float64())
    if "request_timestamp" not in rec.column_names and "request_timestamp" in fields:
        ts = per_item("request_timestamp", pa.float64())
    clicks = pa.table({
        "user": per_row("user_idx", -1, pa.int64()),
        "ts": ts,
        "req": per_row("request_idx", 0, pa.int64()),
        "pos": per_item("position", pa.int64()) if "position" in fields else pa.array(np.zeros(n, np.int64)),
        "item": per_item("note_idx", pa.int64()),
        "click": pc.fill_null(per_item("click", pa.int64()), 0),
    })
    clicks = clicks.filter(pc.and_(pc.greater(clicks["click"], 0), pc.is_valid(clicks["item"])))
    clicks = clicks.sort_by([("user", "ascending"), ("ts", "ascending"), ("req", "ascending"), ("pos", "ascending")])
    u, it = clicks["user"].to_numpy(), clicks["item"].to_numpy()
    t = clicks["ts"].to_numpy(zero_copy_only=False).astype(np.float64)
    same = u[1:] == u[:-1]
    return pa.table({"user_id": u[1:][same], "viewed_note_id": it[:-1][same], "clicked_note_id": it[1:][same], "ts": t[1:][same]},
                    schema=EVENT_SCHEMA)


def _image_uris(raw: pa.Table, image_root: str | None) -> pa.Array:
    if "image_path" not in raw.column_names:
        return pa.nulls(raw.num_rows, pa.string())
    col = raw["image_path"]
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        first = pc.list_element(pc.if_else(pc.greater(pc.fill_null(pc.list_value_length(col), 0), 0), col, pa.scalar(None, col.type)), 0)
    else:
        first = col.cast(pa.string())
    first = first.cast(pa.string())
    if image_root:
        root = image_root.rstrip("/") + "/"
        first = pc.if_else(pc.is_valid(first), pc.binary_join_element_wise(root, first, ""), first)
    return first


def _category(raw: pa.Table) -> pa.Array:
    parts = [raw[c].cast(pa.string()) for c in ("taxonomy1_id", "taxonomy2_id") if c in raw.column_names]
    if not parts:
        return pa.nulls(raw.num_rows, pa.string())
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, "/", null_handling="skip")


def _count_video(raw: pa.Table) -> int:
    if "note_type" not in raw.column_names:
        return 0
    return int(pc.sum(pc.equal(raw["note_type"].cast(pa.int64()), 2)).as_py() or 0)
