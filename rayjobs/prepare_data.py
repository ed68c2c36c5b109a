"""Prepare a corpus: validate notes and clicks, mine related pairs, split train/test, report.

Local (CPU, seconds):

    python -m rayjobs.prepare_data --corpus synthetic --out runs/data/synthetic --num-notes 400
    python -m rayjobs.prepare_data --corpus tuxpaint --out runs/data/tuxpaint --short-fraction 0.3
    python -m rayjobs.prepare_data --corpus movielens --out runs/data/movielens --top-t 5
    python -m rayjobs.prepare_data --corpus qilin --input /data/qilin --image-root /data/qilin/images --out runs/data/qilin
    python -m rayjobs.prepare_data --corpus parquet --input my_corpus/ --out runs/data/mine

`--corpus parquet` reads your own corpus: `<input>/notes.parquet` (columns of
`core.data.schema.NOTE_SCHEMA`; only `note_id` is required; title/content may be binary, and
non-UTF-8 rows are skipped and counted) and `<input>/events.parquet` (`user_id`,
`viewed_note_id`, `clicked_note_id`, optional `ts`). A missing required column, a column that
looks like a misspelt one, or a value of the wrong type stops with one line naming the file,
row and field.

On a Ray cluster (the script runs on the head node; `--out` must be storage the workers see,
e.g. NFS, or copy the folder to s3:// afterwards):

    ray job submit --working-dir . -- python -m rayjobs.prepare_data --corpus tuxpaint --out /mnt/shared/data/tuxpaint

Writes into --out: notes.parquet, events.parquet, pairs_train.parquet, pairs_val.parquet,
pairs_test.parquet (query_id, target_id, score, short_query, short_target) and data_report.json
(counts; every skipped row with its reason). Validation and test query notes are disjoint
seeded draws (`--val-fraction`, `--test-fraction`); training pairs touch neither. Validation
is what training, ASHA, Optuna and the demo choose by; test is read once, by the final evaluation. From Python: `prepare("synthetic", "runs/data/x", num_notes=200)`.
A wholly unreadable input fails at once with one line naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.data.corpora import CORPORA
from core.paths import local_only

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus

DEFAULTS = dict(num_notes=None, seed=0, short_fraction=0.3, lower=0.0, upper=float("inf"), top_t=10,
                test_fraction=0.2, val_fraction=0.1, short_text_chars=20, input=None, image_root=None, embed_images=True)


def prepare(corpus, out_dir, **opts) -> dict:
    """Build a prepared data directory; returns the report dict (also written as JSON).

    Args:
        corpus: an adapter name (`synthetic`, `tuxpaint`, `movielens`, `qilin`, `parquet`) or a
            `core.data.corpora.Corpus` (raw notes + events, e.g. from a test).
        out_dir: local output directory (created).
        **opts: num_notes, seed, short_fraction, lower, upper, top_t, test_fraction,
            short_text_chars, input, image_root, embed_images, plus adapter-specific options
            (see each adapter's `build_*`).
    """
    from core.data import schema
    from core.data.corpora import Corpus, build_corpus
    from core.data.pairs import mine_pairs
    from core.data.report import DataReport
    from core.data.split import dedupe_test_pairs, flag_short, split_pairs

    unknown = set(opts) - set(DEFAULTS) - {"num_users", "events_per_user", "category_depth", "num_topics", "num_variants", "image_px", "split"}
    if unknown:
        raise TypeError(f"prepare: unknown option(s) {sorted(unknown)}")
    if local_only("--out", out_dir):
        raise schema.DataError(local_only("--out", out_dir))
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    t0 = time.time()
    if isinstance(corpus, Corpus):
        raw = corpus
    elif corpus == "parquet":
        raw = read_parquet_corpus(o["input"])
    else:
        adapter_opts = {k: v for k, v in o.items() if k not in ("lower", "upper", "top_t", "test_fraction", "val_fraction", "short_text_chars", "embed_images")}
        raw = build_corpus(corpus, **adapter_opts)
    report = DataReport()
    report.merge(raw.report)

    notes, short_ids = schema.validate_notes(raw.notes, report, short_text_chars=o["short_text_chars"], embed_images=o["embed_images"])
    if notes.num_rows == 0:
        raise schema.DataError(f"{raw.name}: no valid notes left after validation ({report.to_dict()['skipped']})")
    events = schema.validate_events(raw.events, notes["note_id"].to_numpy(), report)
    pairs = mine_pairs(events, lower=o["lower"], upper=o["upper"], top_t=o["top_t"])
    report.count("pairs_mined", pairs.num_rows)
    train, val, test, stats = split_pairs(pairs, test_fraction=o["test_fraction"], val_fraction=o["val_fraction"],
                                          seed=o["seed"])
    report.skip("pairs", "target_is_held_out_query", stats["dropped_leaky"])
    report.skip("pairs", "val_target_is_test_query", stats["dropped_val_leaky"])
    train, val, test = (flag_short(t, short_ids) for t in (train, val, test))
    report.count("test_queries_drawn", stats["test_queries"])
    report.count("val_queries_drawn", stats["val_queries"])
    report.count("pairs_train", train.num_rows)
    for name, held in (("val", val), ("test", test)):
        deduped = dedupe_test_pairs(held)
        report.count(f"pairs_{name}", held.num_rows)
        report.count(f"pairs_{name}_deduped", deduped.num_rows)  # the all-pairs queries evaluation ranks
        report.count(f"pairs_{name}_short_query", int(sum(deduped["short_query"].to_pylist())))
        report.count(f"pairs_{name}_short_target", int(sum(deduped["short_target"].to_pylist())))
    if train.num_rows == 0 or test.num_rows == 0 or (o["val_fraction"] > 0 and val.num_rows == 0):
        print(f"prepare_data: warning: {train.num_rows} train / {val.num_rows} val / {test.num_rows} test pairs; "
              f"widen --lower/--upper or generate more events", file=sys.stderr)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema.write_table(notes, out / schema.NOTES_FILE)
    schema.write_table(events, out / schema.EVENTS_FILE)
    # Train pairs in a seeded random order: mining emits them grouped by query, and a batch of one
    # query's pairs has few usable negatives. Streaming reads keep this order (no reshuffle).
    order = np.random.default_rng(o["seed"]).permutation(train.num_rows)
    schema.write_table(train.take(order).cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["train"])
    schema.write_table(val.cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["val"])
    schema.write_table(test.cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["test"])
    report.info["corpus"] = raw.name
    report.info["options"] = {k: (None if v == float("inf") else v) for k, v in o.items()}
    report.info["seconds"] = round(time.time() - t0, 3)
    report.write(out / schema.REPORT_FILE)
    return report.to_dict()


def read_parquet_corpus(input_dir) -> "Corpus":
    """A user corpus: `<input_dir>/notes.parquet` + `<input_dir>/events.parquet` (module docstring).

    Raises:
        DataError: one line naming the file and, for a bad value, its row and field.
    """
    from core.data import schema
    from core.data.corpora import Corpus
    from core.data.report import DataReport

    if not input_dir:
        raise schema.DataError("parquet: --input DIR is required (a folder with notes.parquet and events.parquet)")
    root = Path(input_dir)
    report = DataReport()
    tables = {}
    for name, sch, textual in (("notes.parquet", schema.NOTE_SCHEMA, ("title", "content", "topics")),
                               ("events.parquet", schema.EVENT_SCHEMA, ())):
        path = root / name
        if not path.is_file():
            raise schema.DataError(f"{path}: not found (--corpus parquet needs notes.parquet and events.parquet in --input)")
        table = schema.read_table(path)
        tables[name] = _conform_rows(table, sch, path, textual, report)
    return Corpus("parquet", tables["notes.parquet"], tables["events.parquet"], report)


def _conform_rows(table, sch, path, textual, report):
    """Cast `table` to schema `sch` column by column; text columns may stay binary (validated later)."""
    import difflib

    import pyarrow as pa

    from core.data.schema import DataError, cast_column

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.prepare_data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", required=True, choices=(*CORPORA, "parquet"),
                   help="corpus adapter; parquet: your own notes.parquet + events.parquet in --input")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", default=None, help="source directory (qilin, parquet: required; tuxpaint/movielens: overrides the installed asset)")
    p.add_argument("--image-root", default=None, help="qilin: directory or URI the image paths are relative to")
    p.add_argument("--num-notes", type=int, default=None, help="corpus size (synthetic) or a seeded subset (others); default: adapter's")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of generation, subsets and the split")
    p.add_argument("--short-fraction", type=float, default=DEFAULTS["short_fraction"], help="synthetic/tuxpaint: notes stripped to an uninformative title")
    p.add_argument("--lower", type=float, default=DEFAULTS["lower"], help="smallest co-occurrence score kept (inclusive)")
    p.add_argument("--upper", type=float, default=DEFAULTS["upper"], help="largest co-occurrence score kept (inclusive)")
    p.add_argument("--top-t", type=int, default=DEFAULTS["top_t"], help="targets kept per query note")
    p.add_argument("--test-fraction", type=float, default=DEFAULTS["test_fraction"], help="fraction of query notes held out for test")
    p.add_argument("--val-fraction", type=float, default=DEFAULTS["val_fraction"],
                   help="fraction of query notes held out for validation (disjoint from test; what runs are chosen by)")
    p.add_argument("--short-text-chars", type=int, default=DEFAULTS["short_text_chars"], help="a note with fewer title+content characters is 'short'")
    p.add_argument("--no-embed-images", dest="embed_images", action="store_false", help="keep image_uri references instead of storing image bytes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.assets import AssetMissingError
    from core.data.schema import DataError

    opts = {k: v for k, v in vars(args).items() if k not in ("corpus", "out")}
    try:
        report = prepare(args.corpus, args.out, **opts)
    except (DataError, AssetMissingError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2
    c = report["counts"]
    print(f"prepared {args.corpus} in {args.out}: {c.get('notes_out')} notes ({c.get('short_notes')} short), "
          f"{c.get('events_out')} events, {c.get('pairs_train')} train / {c.get('pairs_val')} val / "
          f"{c.get('pairs_test')} test pairs; "
          f"skipped: {report['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
