"""The on-disk schemas of a prepared corpus (Parquet via pyarrow) and fail-fast readers.

A prepared data directory holds:

    notes.parquet        one row per note (NOTE_SCHEMA)
    events.parquet       the validated click log (EVENT_SCHEMA)
    pairs_train.parquet  mined related pairs for training (PAIR_SCHEMA + short flags)
    pairs_val.parquet    held-out validation pairs: every mined pair of a validation query note
                         (PAIR_SCHEMA + short flags); evaluation dedupes each subset on its own
    pairs_test.parquet   held-out test pairs, likewise, for test query notes (read once, at the end)
    data_report.json     counts, and every skipped row with its reason

Notes carry their image either inline (`image`: the encoded file bytes) or by reference
(`image_uri`: a local path, `s3://` or `gs://` URI read through `pyarrow.fs`); both may be null
(a text-only note, e.g. MovieLens). `source_id` keeps a corpus's own id when it is not an integer
(a Tux Paint file path, a Qilin `note_idx` string).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.paths import is_remote, join

NOTES_FILE = "notes.parquet"
EVENTS_FILE = "events.parquet"
PAIRS_FILES = {"train": "pairs_train.parquet", "val": "pairs_val.parquet", "test": "pairs_test.parquet"}
HELD_OUT_SPLITS = ("val", "test")
"""`val` is read by everything that chooses (early stopping, ASHA, Optuna, best trial); `test` once."""
REPORT_FILE = "data_report.json"

NOTE_SCHEMA = pa.schema([
    pa.field("note_id", pa.int64(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("topics", pa.list_(pa.string())),
    pa.field("content", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("source_id", pa.string()),
])

EVENT_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("viewed_note_id", pa.int64(), nullable=False),
    pa.field("clicked_note_id", pa.int64(), nullable=False),
    pa.field("ts", pa.float64()),
])

PAIR_SCHEMA = pa.schema([
    pa.field("query_id", pa.int64(), nullable=False),
    pa.field("target_id", pa.int64(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
])

SPLIT_PAIR_SCHEMA = PAIR_SCHEMA.append(pa.field("short_query", pa.bool_())).append(pa.field("short_target", pa.bool_()))


class DataError(ValueError):
    """Input data cannot be used at all; the message is one line naming the file or column."""


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or a directory of them; an unreadable input fails with one line.

    Raises:
        DataError: `<path>: cannot read Parquet (<reason>)`.
    """
    path = str(path)
    try:
        if is_remote(path):
            return pq.read_table(path, columns=columns)
        p = Path(path)
        if p.is_dir():
            files = sorted(p.rglob("*.parquet"))
            if not files:
                raise DataError(f"{path}: no .parquet files in this directory")
            return pa.concat_tables([_read_one(f, columns) for f in files], promote_options="permissive")
        return _read_one(p, columns)
    except DataError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read Parquet ({_one_line(err)})") from None


def _read_one(path: Path, columns: list[str] | None) -> pa.Table:
    try:
        if columns is not None:
            names = pq.ParquetFile(path).schema_arrow.names
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read Parquet ({_one_line(err)})") from None


def cast_column(col, to_type: pa.DataType, path: str | os.PathLike, field: str, rows=None):
    """`col` cast to `to_type`; a value that does not cast fails naming the file, row and field.

    Args:
        col: an Array or ChunkedArray read from `path`.
        to_type: the type the column must become.
        path: the Parquet file, or the directory of files it was read from (`read_table`).
        field: the field name to report (e.g. `note_id`, `rec_result_details_with_idx.note_idx`).
        rows: for a column flattened from a nested one, the source row of each value.

    Raises:
        DataError: `<file>: row <i>, field '<field>': <value> is not a valid <type> (column type <t>)`.
    """
    if col.type == to_type:
        return col
    try:
        return col.cast(to_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise DataError(_first_bad_value(col, to_type, path, field, rows)) from None


def _first_bad_value(col, to_type, path, field: str, rows) -> str:
    """The message for a column that does not cast: its first value that does not."""
    for i, value in enumerate(col.to_pylist()):
        try:
            pa.array([value], type=col.type).cast(to_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            where, row = locate_row(path, int(rows[i]) if rows is not None else i)
            return f"{where}: row {row}, field {field!r}: {value!r} is not a valid {to_type} (column type {col.type})"
    return f"{path}: field {field!r}: column type {col.type} cannot become {to_type}"


def locate_row(path: str | os.PathLike, row: int) -> tuple[str, int]:
    """(file, row in that file) of row `row` of what `read_table(path)` returned: for a
    directory, the files in the order `read_table` concatenates them."""
    p = Path(path)
    if "://" in str(path) or not p.is_dir():
        return str(path), row
    for f in sorted(p.rglob("*.parquet")):
        n = pq.ParquetFile(f).metadata.num_rows
        if row < n:
            return str(f), row
        row -= n
    return str(path), row


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write atomically (a temporary file then a rename) so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def data_path(data_dir: str | os.PathLike, name: str) -> str:
    """`data_dir/name` for local paths and URIs alike."""
    return join(data_dir, name)


def validate_notes(notes: pa.Table, report, *, short_text_chars: int = 20, embed_images: bool = True,
                   max_pixels: int | None = None, title_max_chars: int = 20, content_max_chars: int = 80,
                   language: str = "en") -> tuple[pa.Table, list[int]]:
    """Validate raw notes; return (clean notes in NOTE_SCHEMA, ids of short notes).

    Rules (each drop or fix counted in `report`):
    - null note_id -> note skipped (`notes.missing_note_id`); duplicate note_id -> later rows
      skipped (`notes.duplicate_note_id`, the first row wins);
    - title/content that are bytes and not valid UTF-8 -> note skipped (`notes.invalid_utf8`);
      no title, no content and no topics -> note skipped (`notes.empty_text`);
    - every image is decoded: an undecodable one (`corrupt`, `truncated`, `zero_bytes`,
      `too_large`, `unreadable_uri`) is removed and the note kept text-only
      (`images.<reason>`); a non-RGB one (CMYK, P, LA, RGBA, ...) is converted to RGB and
      re-encoded as PNG (`converted.images.<mode>_to_RGB`). With `embed_images` an `image_uri`
      is read and its bytes stored inline.
    - short: len(title) + len(content) after `core.prompts.clean_note_text` < short_text_chars.
    """
    from core.data.images import MAX_IMAGE_PIXELS, decode_image, encode_png, read_uri
    from core.prompts import clean_note_text

    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    n_in = notes.num_rows
    cols = {name: (notes.column(name).to_pylist() if name in notes.column_names else [None] * n_in) for name in NOTE_SCHEMA.names}
    out = {name: [] for name in NOTE_SCHEMA.names}
    seen: set[int] = set()
    short_ids: list[int] = []
    for i in range(n_in):
        nid = cols["note_id"][i]
        if nid is None:
            report.skip("notes", "missing_note_id")
            continue
        nid = int(nid)
        if nid in seen:
            report.skip("notes", "duplicate_note_id")
            continue
        try:
            title, content = _as_text(cols["title"][i]), _as_text(cols["content"][i])
            topics = [_as_text(t) for t in (cols["topics"][i] or []) if t is not None]
        except UnicodeDecodeError:
            report.skip("notes", "invalid_utf8")
            continue
        topics = [t for t in topics if t.strip()]
        if not (title.strip() or content.strip() or topics):
            report.skip("notes", "empty_text")
            continue
        seen.add(nid)
        image, uri = cols["image"][i], cols["image_uri"][i]
        if image is not None or uri:
            data = image
            if data is None:
                try:
                    data = read_uri(uri)
                except OSError:
                    data = None
                    report.skip("images", "unreadable_uri")
                    image, uri = None, None
            if data is not None:
                img, reason, mode = decode_image(data, max_pixels)
                if img is None:
                    report.skip("images", reason)
                    image, uri = None, None
                elif mode != "RGB":
                    report.convert("images", f"{mode}_to_RGB")
                    image = encode_png(img)
                elif embed_images:
                    image = data
        out["note_id"].append(nid)
        out["title"].append(title)
        out["topics"].append(topics)
        out["content"].append(content)
        out["image"].append(image)
        out["image_uri"].append(uri)
        out["category"].append(None if cols["category"][i] is None else str(cols["category"][i]))
        out["source_id"].append(None if cols["source_id"][i] is None else str(cols["source_id"][i]))
        text = clean_note_text(title, topics, content, language=language, title_max_chars=title_max_chars,
                               content_max_chars=content_max_chars)
        if len(text.title) + len(text.content) < short_text_chars:
            short_ids.append(nid)
    report.count("notes_in", n_in)
    report.count("notes_out", len(out["note_id"]))
    report.count("notes_with_image", sum(1 for a, b in zip(out["image"], out["image_uri"]) if a is not None or b))
    report.count("short_notes", len(short_ids))
    return pa.table(out, schema=NOTE_SCHEMA), short_ids


def _as_text(value) -> str:
    """str as is; bytes must be UTF-8 (raises UnicodeDecodeError); None -> ''."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


def validate_events(events: pa.Table, note_ids, report) -> pa.Table:
    """Drop (and count) events with null ids, NaN/negative timestamps or unknown notes.

    A null timestamp is allowed (mining ignores time); NaN and negative ones are not.
    """
    import numpy as np
    import pyarrow.compute as pc

    n_in = events.num_rows
    t = pa.table({name: (events.column(name) if name in events.column_names else pa.nulls(n_in, f.type)) for name, f in
                  zip(EVENT_SCHEMA.names, EVENT_SCHEMA)})
    for name in ("user_id", "viewed_note_id", "clicked_note_id"):
        if name not in events.column_names:
            raise DataError(f"events: required column {name!r} is missing (has {events.column_names})")
    try:
        t = pa.table({name: t.column(name).cast(f.type) for name, f in zip(EVENT_SCHEMA.names, EVENT_SCHEMA)})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(f"events: cannot cast to {EVENT_SCHEMA}: {_one_line(err)}") from None

    def drop(mask, reason):
        nonlocal t
        mask = pc.fill_null(mask, False)
        report.skip("events", reason, int(pc.sum(mask).as_py() or 0))
        t = t.filter(pc.invert(mask))

    ids_valid = pc.and_(pc.and_(pc.is_valid(t["user_id"]), pc.is_valid(t["viewed_note_id"])), pc.is_valid(t["clicked_note_id"]))
    drop(pc.invert(ids_valid), "missing_id")
    drop(pc.is_nan(t["ts"]), "nan_timestamp")
    drop(pc.less(t["ts"], 0.0), "negative_timestamp")
    known = pa.array(np.asarray(note_ids, dtype=np.int64))
    unknown = pc.or_(pc.invert(pc.is_in(t["viewed_note_id"], value_set=known)), pc.invert(pc.is_in(t["clicked_note_id"], value_set=known)))
    drop(unknown, "unknown_note")
    report.count("events_in", n_in)
    report.count("events_out", t.num_rows)
    return t


def check_prepared(data_dir: str | os.PathLike) -> None:
    """Fail fast on a prepared directory whose pairs name notes it does not hold.

    The training pipeline joins pairs with notes (an inner join), so a pair pointing at a missing
    note would vanish silently; this reads only the id columns and names the first such pair.

    Raises:
        DataError: `<pairs file>: row <i>, field '<query_id|target_id>': note <id> is not in notes.parquet`.
    """
    import numpy as np

    notes_file = data_path(data_dir, NOTES_FILE)
    ids = np.sort(read_table(notes_file, columns=["note_id"]).column("note_id").to_numpy(zero_copy_only=False))
    for name in PAIRS_FILES.values():
        pairs_file = data_path(data_dir, name)
        pairs = read_table(pairs_file, columns=["query_id", "target_id"])
        for field in ("query_id", "target_id"):
            if field not in pairs.column_names:
                raise DataError(f"{pairs_file}: required column {field!r} is missing (has {pairs.column_names})")
            values = pairs.column(field).to_numpy(zero_copy_only=False)
            pos = np.searchsorted(ids, values).clip(0, max(len(ids) - 1, 0))
            bad = np.flatnonzero(ids[pos] != values) if len(ids) else np.arange(len(values))
            if len(bad):
                i = int(bad[0])
                raise DataError(f"{pairs_file}: row {i}, field {field!r}: note {values[i]} is not in {NOTES_FILE} "
                                f"({len(bad)} such rows; re-run rayjobs.prepare_data)")
