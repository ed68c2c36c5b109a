"""Tux Paint stamps as a small real multimodal corpus (Debian `tuxpaint-stamps-default`).

The stamps tree is category folders (`animals/birds/`, `food/fruit/cartoon/`, ...) holding
images and caption files. One note per PNG stamp:

- title: the stamp's file name (`sword_in_the_stone.png` -> "sword in the stone");
- content: the English caption = first line of the sibling `.txt` (later lines are
  `lang.utf8=...` translations and are ignored);
- topics: the folder path parts (`["food", "fruit", "cartoon"]`);
- category (relatedness ground truth): the first `category_depth` folder parts (`food/fruit`);
- image: the PNG bytes.

SVG stamps are skipped and counted (`source.svg_not_supported`): decoding SVG needs a renderer
(cairosvg) the project does not depend on. A PNG without a caption keeps an empty content.

Short notes: a seeded `short_fraction` of notes is stripped to an uninformative title
("my stamp", "look!", ...) with no topics and no content, so for those notes only the image
tells the category — the paper's short-note effect.

Click log: `core.data.corpora.synthetic.simulate_clicks` over the categories (users with 1-3
category interests; a click stays in the viewed note's category with probability 0.85).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from core.data.corpora.synthetic import short_note, simulate_clicks, subsample
from core.data.schema import NOTE_SCHEMA

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus


def build_tuxpaint(input: str | None = None, num_notes: int | None = None, seed: int = 0, short_fraction: float = 0.3,
                   category_depth: int = 2, num_users: int | None = None, events_per_user: int = 30) -> "Corpus":
    """Read the stamps tree into notes and simulate clicks.

    Args:
        input: stamps directory; default `core.assets.tuxpaint_stamps_dir()`.
        num_notes: keep a seeded random subset of this many PNG stamps (None: all ~800).
        seed: seed of the subset, the short notes and the users.
        short_fraction: fraction of notes stripped to an uninformative title.
        category_depth: folder parts that make the category.
        num_users, events_per_user: click-log size (users default to notes // 2).
    """
    from core.data.corpora import Corpus
    from core.data.report import DataReport

    root = Path(input) if input else _default_root()
    report = DataReport()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".svg"))
    pngs = [p for p in files if p.suffix.lower() == ".png"]
    report.skip("source", "svg_not_supported", len(files) - len(pngs))
    if not pngs:
        from core.data.schema import DataError

        raise DataError(f"{root}: no PNG stamps found (is this the Tux Paint stamps directory?)")
    rng = np.random.default_rng(seed)
    pngs = subsample(pngs, num_notes, rng, report)
    short = rng.random(len(pngs)) < short_fraction
    rows, missing_caption = [], 0
    for i, png in enumerate(pngs):
        rel = png.relative_to(root)
        parts = list(rel.parent.parts)
        caption = _read_caption(png.with_suffix(".txt"))
        missing_caption += caption is None
        if short[i]:
            title, content, topics = short_note(rng)
        else:
            title, content, topics = png.stem.replace("_", " ").replace("-", " ").strip(), caption or "", parts
        rows.append({"note_id": i, "title": title, "topics": topics, "content": content, "image": png.read_bytes(),
                     "image_uri": None, "category": "/".join(parts[:category_depth]) or "root", "source_id": str(rel)})
    report.info["tuxpaint"] = {"root": str(root), "png_without_caption": missing_caption, "short_notes": int(short.sum())}
    notes = pa.Table.from_pylist(rows, schema=NOTE_SCHEMA)
    events = simulate_clicks(np.asarray([r["category"] for r in rows]), num_users=num_users or max(2, len(pngs) // 2),
                             events_per_user=events_per_user, seed=seed + 1)
    return Corpus("tuxpaint", notes, events, report)


def _default_root() -> Path:
    from core import assets

    return assets.tuxpaint_stamps_dir()


def _read_caption(path: Path) -> str | None:
    """First line of a caption file (English), or None when there is no file."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    first = text.splitlines()[0].strip() if text.strip() else ""
    return first
