"""Your own corpus as Parquet files: `<input>/notes.parquet` and `<input>/events.parquet`.

notes.parquet has the columns of `core.data.schema.NOTE_SCHEMA`; only `note_id` is required;
title/content may be binary (non-UTF-8 rows are skipped and counted by validation).
events.parquet has `user_id`, `viewed_note_id`, `clicked_note_id` and an optional `ts`. A
missing required column, a column that looks like a misspelt one, or a value of the wrong type
stops with one line naming the file, row and field; a column the schema does not know is
ignored and listed in the report (`info.ignored_columns`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pyarrow as pa

from core.data.corpora import Corpus
from core.data.report import DataReport
from core.data.schema import EVENT_SCHEMA, NOTE_SCHEMA, DataError, cast_column, read_table


def build_parquet(input: str | None = None) -> Corpus:
    """A user corpus: `<input>/notes.parquet` + `<input>/events.parquet` (module docstring).

    Raises:
        DataError: one line naming the file and, for a bad value, its row and field.
    """
    if not input:
        raise DataError("parquet: --input DIR is required (a folder with notes.parquet and events.parquet)")
    root = Path(input)
    report = DataReport()
    tables = {}
    for name, sch, textual in (("notes.parquet", NOTE_SCHEMA, ("title", "content", "topics")),
                               ("events.parquet", EVENT_SCHEMA, ())):
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: not found (--corpus parquet needs notes.parquet and events.parquet in --input)")
        table = read_table(path)
        tables[name] = _conform_rows(table, sch, path, textual, report)
    return Corpus("parquet", tables["notes.parquet"], tables["events.parquet"], report)


def _conform_rows(table, sch, path, textual, report):
    """Cast `table` to schema `sch` column by column; text columns may stay binary (validated later)."""
    names = sch.names
    for col in table.column_names:
        if col not in names:
            near = difflib.get_close_matches(col, names, n=1, cutoff=0.75)
            if near and near[0] not in table.column_names:
                raise DataError(f"{path}: unknown column {col!r} (did you mean {near[0]!r}?)")
            report.info.setdefault("ignored_columns", {}).setdefault(path.name, []).append(col)
    cols = {}
    for field in sch:
        if field.name not in table.column_names:
            if not field.nullable:
                raise DataError(f"{path}: required column {field.name!r} is missing (has {table.column_names})")
            continue
        col = table.column(field.name)
        binary_text = field.name in textual and (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
                                                 or (pa.types.is_list(col.type) and pa.types.is_binary(col.type.value_type)))
        if not binary_text:
            col = cast_column(col, field.type, path, field.name)
        cols[field.name] = col
    return pa.table(cols)
