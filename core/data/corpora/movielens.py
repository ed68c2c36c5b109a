"""MovieLens-100k (shipped inside the `recbole` package) as a text-only corpus.

Notes: one per movie — title = `movie_title`, content = "Released in <year>.", topics = the
genres of `class`, category = the genre list joined by "|" (no image: `image` and `image_uri`
are null, and everything downstream treats the note as image-less).

Events: for each user, ratings sorted by (timestamp, item id); every pair of consecutive
ratings (previous movie, next movie) is one (viewed, clicked) event with the later timestamp.
This is the usual "what did the user watch next" reading of a rating log.

Files are RecBole atomic files: tab-separated, with typed headers (`item_id:token`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core.data.schema import EVENT_SCHEMA, NOTE_SCHEMA, DataError

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus


def build_movielens(input: str | None = None, num_notes: int | None = None, seed: int = 0) -> "Corpus":
    """Read ml-100k.item / ml-100k.inter into notes and next-movie events.

    Args:
        input: directory with `ml-100k.item` and `ml-100k.inter`; default
            `core.assets.movielens_100k_dir()`.
        num_notes: keep only the `num_notes` most-rated movies (None: all 1682).
        seed: unused (the corpus is deterministic); accepted for a uniform CLI.
    """
    from core.data.corpora import Corpus
    from core.data.report import DataReport

    root = Path(input) if input else _default_root()
    items = read_atomic(root / "ml-100k.item")
    inter = read_atomic(root / "ml-100k.inter")
    report = DataReport()

    item_id = _to_int(items["item_id"], root / "ml-100k.item", report, "notes")
    ok = pc.is_valid(item_id)
    items, item_id = items.filter(ok), item_id.filter(ok)
    years = items["release_year"].cast(pa.string()) if "release_year" in items.column_names else pa.nulls(items.num_rows, pa.string())
    genres = pc.utf8_split_whitespace(pc.fill_null(items["class"].cast(pa.string()), "")) if "class" in items.column_names else None
    content = pc.if_else(pc.is_valid(years), pc.binary_join_element_wise("Released in ", years, ".", ""), pa.scalar(None, pa.string()))
    notes = pa.table({
        "note_id": item_id,
        "title": items["movie_title"].cast(pa.string()),
        "topics": genres if genres is not None else pa.nulls(items.num_rows, pa.list_(pa.string())),
        "content": content,
        "image": pa.nulls(items.num_rows, pa.binary()),
        "image_uri": pa.nulls(items.num_rows, pa.string()),
        "category": pc.binary_join(genres, "|") if genres is not None else pa.nulls(items.num_rows, pa.string()),
        "source_id": item_id.cast(pa.string()),
    }, schema=NOTE_SCHEMA)

    user = _to_int(inter["user_id"], root / "ml-100k.inter", report, "events")
    item = _to_int(inter["item_id"], root / "ml-100k.inter", report, "events")
    ts = inter["timestamp"].cast(pa.float64())
    log = pa.table({"user": user, "item": item, "ts": ts})
    log = log.filter(pc.and_(pc.is_valid(log["user"]), pc.is_valid(log["item"])))
    if num_notes is not None and num_notes < notes.num_rows:
        popular = log.group_by("item").aggregate([([], "count_all")]).sort_by([("count_all", "descending"), ("item", "ascending")])
        keep = popular["item"].slice(0, num_notes)
        report.skip("source", "not_sampled", notes.num_rows - num_notes)
        notes = notes.filter(pc.is_in(notes["note_id"], value_set=keep))
        dropped = log.num_rows
        log = log.filter(pc.is_in(log["item"], value_set=keep))
        report.skip("source", "rating_of_unsampled_movie", dropped - log.num_rows)
    events = consecutive_events(log)
    return Corpus("movielens", notes, events, report)


def consecutive_events(log: pa.Table) -> pa.Table:
    """(user, item, ts) rows -> one (prev item -> next item) event per consecutive pair per user.

    NaN timestamps sort last (Arrow's default) and are passed through for validation to count.
    """
    log = log.sort_by([("user", "ascending"), ("ts", "ascending"), ("item", "ascending")])
    u = log["user"].to_numpy()
    it = log["item"].to_numpy()
    ts = log["ts"].to_numpy(zero_copy_only=False).astype(np.float64)
    same_user = u[1:] == u[:-1]
    return pa.table({
        "user_id": u[1:][same_user], "viewed_note_id": it[:-1][same_user],
        "clicked_note_id": it[1:][same_user], "ts": ts[1:][same_user],
    }, schema=EVENT_SCHEMA)


def read_atomic(path: Path) -> pa.Table:
    """A RecBole atomic file (TSV, headers `name:type`) with the type suffixes stripped."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=None),
        )
    except (OSError, pa.ArrowException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot read RecBole atomic file ({first})") from None
    return table.rename_columns([c.split(":", 1)[0] for c in table.column_names])


def _to_int(col, path: Path, report, stage: str) -> pa.ChunkedArray:
    """Cast ids to int64; ids that are not integers become null and are counted."""
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64())
    as_str = col.cast(pa.string())
    numeric = pc.match_substring_regex(as_str, r"^\s*-?\d+\s*$")
    report.skip(stage, "non_integer_id", int(pc.sum(pc.invert(pc.fill_null(numeric, False))).as_py() or 0))
    return pc.if_else(numeric, as_str, pa.scalar(None, pa.string())).cast(pa.int64())


def _default_root() -> Path:
    from core import assets

    return assets.movielens_100k_dir()
