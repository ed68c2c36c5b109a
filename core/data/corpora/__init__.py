"""Corpus adapters: each turns a source into raw notes + a click log in the project schema.

    corpus = build_corpus("synthetic", num_notes=400, seed=0)
    corpus.notes   # pyarrow Table in core.data.schema.NOTE_SCHEMA (not yet validated)
    corpus.events  # pyarrow Table in core.data.schema.EVENT_SCHEMA (not yet validated)

Adapters only translate; `core.data.prepare` validates (images, text, ids, timestamps),
mines pairs and splits. Rows an adapter cannot translate are counted in `corpus.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from core.data.report import DataReport

CORPORA = ("synthetic", "tuxpaint", "movielens", "qilin", "openclipart", "parquet")
"""Adapter names (`build_corpus`); `parquet` reads your own notes.parquet + events.parquet."""


@dataclass
class Corpus:
    """Raw notes and events from one adapter, plus what the adapter skipped."""

    name: str
    notes: pa.Table
    events: pa.Table
    report: DataReport = field(default_factory=DataReport)


def build_corpus(name: str, **opts) -> Corpus:
    """Run the adapter `name` with its keyword options (unknown options are ignored by design:
    the CLI passes one option set to every adapter)."""
    if name == "synthetic":
        from core.data.corpora.synthetic import build_synthetic as fn
    elif name == "tuxpaint":
        from core.data.corpora.tuxpaint import build_tuxpaint as fn
    elif name == "movielens":
        from core.data.corpora.movielens import build_movielens as fn
    elif name == "qilin":
        from core.data.corpora.qilin import build_qilin as fn
    elif name == "openclipart":
        from core.data.corpora.openclipart import build_openclipart as fn
    elif name == "parquet":
        from core.data.corpora.parquet import build_parquet as fn
    else:
        raise ValueError(f"corpus {name!r}: allowed {', '.join(CORPORA)}")
    import inspect

    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in opts.items() if k in accepted and v is not None})
