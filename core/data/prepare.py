"""Data preparation as a library: a corpus adapter's notes and click log in, a prepared data
directory out (validated notes, mined related pairs, a leakage-free train/val/test split and a
report of every count and skipped row).

    from core.config import PrepareConfig
    from core.data.prepare import prepare

    report = prepare("synthetic", "runs/data/x", PrepareConfig(num_notes=200))
    report = prepare("tuxpaint", "runs/data/t", num_notes=120, short_fraction=0.5)  # the same, as keywords

`python -m rayjobs.prepare_data` is its command line. Writes into `out_dir`: notes.parquet,
events.parquet, pairs_train/val/test.parquet (query_id, target_id, score, short_query,
short_target) and data_report.json. Validation and test query notes are disjoint seeded draws;
training pairs touch neither. Validation is what training, ASHA, Optuna and the demo choose by;
test is read once, by the final evaluation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.config import PrepareConfig
from core.data import schema
from core.data.corpora import Corpus, build_corpus
from core.data.pairs import mine_pairs
from core.data.report import DataReport
from core.data.split import dedupe_test_pairs, flag_short, split_pairs
from core.paths import local_only


def prepare(corpus: str | Corpus, out_dir: str | Path, config: PrepareConfig | None = None, **options: Any) -> dict:
    """Build a prepared data directory; returns the report dict (also written as JSON).

    Args:
        corpus: an adapter name (`core.data.corpora.CORPORA`) or a `Corpus` (raw notes + events,
            e.g. from a test).
        out_dir: local output directory (created).
        config: the options; None builds one from `options`.
        **options: `PrepareConfig` fields, when `config` is None (None values keep the default).

    Raises:
        ConfigError: an option out of range or of the wrong type, naming it.
        DataError: unreadable input or nothing valid left, one line naming the file.
    """
    if config is None:
        config = PrepareConfig(**{k: v for k, v in options.items() if v is not None})
    elif options:
        raise TypeError(f"prepare: pass options in `config` or as keywords, not both ({sorted(options)})")
    if local_only("--out", out_dir):
        raise schema.DataError(local_only("--out", out_dir))
    t0 = time.time()
    raw = corpus if isinstance(corpus, Corpus) else build_corpus(corpus, **config.adapter_options())
    report = DataReport()
    report.merge(raw.report)

    notes, short_ids = schema.validate_notes(raw.notes, report, short_text_chars=config.short_text_chars,
                                             embed_images=config.embed_images)
    if notes.num_rows == 0:
        raise schema.DataError(f"{raw.name}: no valid notes left after validation ({report.to_dict()['skipped']})")
    events = schema.validate_events(raw.events, notes["note_id"].to_numpy(), report)
    pairs = mine_pairs(events, lower=config.lower, upper=config.upper, top_t=config.top_t)
    report.count("pairs_mined", pairs.num_rows)
    train, val, test, stats = split_pairs(pairs, test_fraction=config.test_fraction, val_fraction=config.val_fraction,
                                          seed=config.seed)
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
    if train.num_rows == 0 or test.num_rows == 0 or (config.val_fraction > 0 and val.num_rows == 0):
        print(f"prepare_data: warning: {train.num_rows} train / {val.num_rows} val / {test.num_rows} test pairs; "
              f"widen --lower/--upper or generate more events", file=sys.stderr)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema.write_table(notes, out / schema.NOTES_FILE)
    schema.write_table(events, out / schema.EVENTS_FILE)
    # Train pairs in a seeded random order: mining emits them grouped by query, and a batch of one
    # query's pairs has few usable negatives. Streaming reads keep this order (no reshuffle).
    order = np.random.default_rng(config.seed).permutation(train.num_rows)
    schema.write_table(train.take(order).cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["train"])
    schema.write_table(val.cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["val"])
    schema.write_table(test.cast(schema.SPLIT_PAIR_SCHEMA), out / schema.PAIRS_FILES["test"])
    report.info["corpus"] = raw.name
    report.info["options"] = config.to_dict()
    report.info["seconds"] = round(time.time() - t0, 3)
    report.write(out / schema.REPORT_FILE)
    return report.to_dict()
