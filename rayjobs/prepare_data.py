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
`viewed_note_id`, `clicked_note_id`, optional `ts`); see `core.data.corpora.parquet`. A missing
required column, a column that looks like a misspelt one, or a value of the wrong type stops
with one line naming the file, row and field.

On a Ray cluster (the script runs on the head node; `--out` must be storage the workers see,
e.g. NFS, or copy the folder to s3:// afterwards):

    ray job submit --working-dir . -- python -m rayjobs.prepare_data --corpus tuxpaint --out /mnt/shared/data/tuxpaint

Writes into --out: notes.parquet, events.parquet, pairs_train.parquet, pairs_val.parquet,
pairs_test.parquet (query_id, target_id, score, short_query, short_target) and data_report.json
(counts; every skipped row with its reason). Validation and test query notes are disjoint
seeded draws (`--val-fraction`, `--test-fraction`); training pairs touch neither. Validation
is what training, ASHA, Optuna and the demo choose by; test is read once, by the final
evaluation. This is the command line of `core.data.prepare.prepare` (the library, with its typed
`core.config.PrepareConfig`). A wholly unreadable input or an option out of range fails at once
with one line naming the file or the option (exit status 2).
"""

from __future__ import annotations

import argparse
import sys

from core.assets import AssetMissingError
from core.config import ConfigError, PrepareConfig
from core.data.corpora import CORPORA
from core.data.prepare import prepare
from core.data.schema import DataError

D = PrepareConfig()  # the defaults the flags show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.prepare_data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", required=True, choices=CORPORA,
                   help="corpus adapter; parquet: your own notes.parquet + events.parquet in --input")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", default=None, help="source directory (qilin, parquet: required; tuxpaint/movielens/openclipart: overrides the installed asset)")
    p.add_argument("--image-root", default=None, help="qilin, openclipart: directory or URI the image paths are relative to")
    p.add_argument("--num-notes", type=int, default=None, help="corpus size (synthetic) or a seeded subset (others); default: adapter's")
    p.add_argument("--seed", type=int, default=D.seed, help="seed of generation, subsets and the split")
    p.add_argument("--short-fraction", type=float, default=D.short_fraction, help="synthetic/tuxpaint/openclipart: notes stripped to an uninformative title")
    p.add_argument("--lower", type=float, default=D.lower, help="smallest co-occurrence score kept (inclusive)")
    p.add_argument("--upper", type=float, default=D.upper, help="largest co-occurrence score kept (inclusive)")
    p.add_argument("--top-t", type=int, default=D.top_t, help="targets kept per query note")
    p.add_argument("--test-fraction", type=float, default=D.test_fraction, help="fraction of query notes held out for test")
    p.add_argument("--val-fraction", type=float, default=D.val_fraction,
                   help="fraction of query notes held out for validation (disjoint from test; what runs are chosen by)")
    p.add_argument("--short-text-chars", type=int, default=D.short_text_chars, help="a note with fewer title+content characters is 'short'")
    p.add_argument("--no-embed-images", dest="embed_images", action="store_false", help="keep image_uri references instead of storing image bytes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("corpus", "out") and v is not None}
    try:
        report = prepare(args.corpus, args.out, PrepareConfig(**options))
    except (ConfigError, DataError, AssetMissingError) as err:
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
