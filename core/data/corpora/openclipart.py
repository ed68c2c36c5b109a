"""Open Clip Art (Debian `openclipart-svg`) as a second real multimodal corpus.

The package is a tree of category folders (`animals/birds/`, `food/fruit/`, ...) holding SVG
clip art. Some items appear in several folders (as symbolic links to one file): those items
belong to several categories, which makes relatedness graded rather than a partition. One note
per distinct SVG file:

- title: the work's `dc:title` from the SVG metadata (the file stem when there is none);
- topics: the work's keywords (`dc:subject` bag), then the folder parts;
- content: the work's `dc:description` (often empty);
- category (relatedness ground truth): the first `category_depth` folder parts of the file's
  own folder; the folders its links sit in are extra categories for the simulated users;
- image: the SVG rendered to PNG by `render_tree` (run once by
  `python -m rayjobs.fetch_assets --openclipart` and cached).

Items under pattern and gradient folders (fills, not pictures) are dropped and counted, as are
SVGs that did not render. Short notes and the click log as for Tux Paint
(`core.data.corpora.synthetic.simulate_clicks`, with the extra categories).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from core.data.corpora.synthetic import short_note, simulate_clicks, subsample
from core.data.schema import NOTE_SCHEMA

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus

DROPPED_FOLDERS = ("patterns", "gradients")
"""Folder names whose items are fills, not pictures."""
RENDER_PX = 160
"""Longest side of the rendered PNGs (the image pipeline resizes to the encoder's size)."""
_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
       "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
_METADATA = re.compile(rb"<metadata.*?</metadata>", re.S)
_TITLE = re.compile(rb"<dc:title>([^<]*)</dc:title>")


def build_openclipart(input: str | None = None, num_notes: int | None = None, seed: int = 0, short_fraction: float = 0.3,
                      category_depth: int = 2, num_users: int | None = None, events_per_user: int = 30,
                      image_root: str | None = None) -> "Corpus":
    """Read the clip-art tree and its rendered PNGs into notes and simulate clicks.

    Args:
        input: the SVG tree; default `core.assets.openclipart_svg_dir()`.
        num_notes: keep a seeded random subset of this many items (None: all).
        seed: seed of the subset, the short notes and the users.
        short_fraction: fraction of notes stripped to an uninformative title.
        category_depth: folder parts that make a category.
        num_users, events_per_user: click-log size (users default to notes // 2).
        image_root: the rendered PNG tree (`render_tree`'s output); default `png_dir(input)`.
    """
    from core.data.corpora import Corpus
    from core.data.report import DataReport
    from core.data.schema import DataError

    root = Path(input) if input else _default_root()
    png_root = Path(image_root) if image_root else png_dir(root)
    report = DataReport()
    items = collect_items(root, report)
    if not items:
        raise DataError(f"{root}: no SVG clip art found (is this the openclipart svg directory?)")
    rendered = []
    for rel, folders in items:
        png = png_root / Path(rel).with_suffix(".png")
        if png.is_file():
            rendered.append((rel, folders, png))
    report.skip("source", "not_rendered", len(items) - len(rendered))
    if not rendered:
        raise DataError(f"{png_root}: no rendered PNGs; run: python -m rayjobs.fetch_assets --openclipart")
    rng = np.random.default_rng(seed)
    rendered = subsample(rendered, num_notes, rng, report)
    short = rng.random(len(rendered)) < short_fraction
    rows, extra = [], []
    for i, (rel, folders, png) in enumerate(rendered):
        title, keywords, description = read_metadata(root / rel)
        parts = list(Path(folders[0]).parts)
        if short[i]:
            title, content, topics = short_note(rng)
        else:
            title = title or Path(rel).stem.replace("_", " ").strip()
            content, topics = description, _unique(keywords + parts)
        category = _category(folders[0], category_depth)
        rows.append({"note_id": i, "title": title, "topics": topics, "content": content, "image": png.read_bytes(),
                     "image_uri": None, "category": category, "source_id": rel})
        extra.append(sorted({_category(f, category_depth) for f in folders[1:]} - {category}))
    report.info["openclipart"] = {"root": str(root), "short_notes": int(short.sum()),
                                  "notes_in_several_categories": sum(bool(e) for e in extra)}
    notes = pa.Table.from_pylist(rows, schema=NOTE_SCHEMA)
    events = simulate_clicks(np.asarray([r["category"] for r in rows]), num_users=num_users or max(2, len(rows) // 2),
                             events_per_user=events_per_user, seed=seed + 1, extra_categories=extra)
    return Corpus("openclipart", notes, events, report)


def collect_items(root: Path, report) -> list[tuple[str, list[str]]]:
    """Distinct SVG files under `root` as (path relative to root, [own folder, link folders...]),
    sorted by path; pattern/gradient items and links leading outside the tree are counted."""
    folders: dict[str, list[str]] = {}
    links: list[tuple[str, str]] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.lower().endswith(".svg"):
                continue
            path = Path(dirpath) / name
            folder = str(path.parent.relative_to(root))
            if path.is_symlink():
                links.append((str(path.resolve()), folder))
            else:
                folders.setdefault(str(path.relative_to(root)), [folder])
    for target, folder in links:
        try:
            rel = str(Path(target).relative_to(root.resolve()))
        except ValueError:
            rel = None
        if rel is None or rel not in folders:
            report.skip("source", "dangling_link", 1)
        elif folder not in folders[rel]:
            folders[rel].append(folder)
    kept = []
    for rel in sorted(folders):
        if any(part in DROPPED_FOLDERS for part in Path(rel).parts[:-1]):
            report.skip("source", "pattern_or_gradient", 1)
        else:
            kept.append((rel, folders[rel]))
    return kept


def read_metadata(svg: Path) -> tuple[str, list[str], str]:
    """(title, keywords, description) of the work in an SVG's RDF metadata, the creator's name
    left out of title and keywords; empty when absent or unreadable (the title then falls back
    to the file name)."""
    try:
        block = _METADATA.search(svg.read_bytes()[:200_000])
    except OSError:
        return "", [], ""
    if block is None:
        return "", [], ""
    # the block alone, its prefixes bound here (files declare them on <svg> or on <rdf:RDF>)
    wrapped = b"<m " + b" ".join(f'xmlns:{k}="{v}"'.encode() for k, v in _NS.items()) + b">" + block.group(0) + b"</m>"
    try:
        work = ET.fromstring(wrapped).find(".//cc:Work", _NS)
    except ET.ParseError:  # another unbound prefix or entity: the title alone, by pattern
        title = _TITLE.search(block.group(0))
        return (title.group(1).decode("utf-8", "replace").strip() if title else ""), [], ""
    if work is None:
        return "", [], ""
    title = (work.findtext("dc:title", default="", namespaces=_NS) or "").strip()
    description = (work.findtext("dc:description", default="", namespaces=_NS) or "").strip()
    keywords = [(li.text or "").strip() for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
    # many items carry their author's name as title or keyword: it says nothing about the picture
    creator = (work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=_NS) or "").strip().lower()
    if creator and title.lower() == creator:
        title = ""
    return title, [k for k in keywords if k and k.lower() != creator], description


def render_tree(svg_root: Path, png_root: Path, *, px: int = RENDER_PX, workers: int | None = None,
                progress=print) -> dict:
    """Render every item of `collect_items(svg_root)` to `png_root/<same path>.png` (longest side
    `px`, white background), skipping PNGs already there; returns counts {rendered, cached, failed}.

    Runs in `workers` processes (default: all cores) with a progress line every 500 items."""
    from concurrent.futures import ProcessPoolExecutor

    from core.data.report import DataReport

    items = [rel for rel, _ in collect_items(svg_root, DataReport())]
    todo = [rel for rel in items if not (png_root / Path(rel).with_suffix(".png")).is_file()]
    counts = {"rendered": 0, "cached": len(items) - len(todo), "failed": 0}
    jobs = [(str(svg_root / rel), str(png_root / Path(rel).with_suffix(".png")), px) for rel in todo]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for n, ok in enumerate(pool.map(_render_one, jobs, chunksize=16), start=1):
            counts["rendered" if ok else "failed"] += 1
            if n % 500 == 0 or n == len(jobs):
                progress(f"openclipart: rendered {n}/{len(jobs)} SVGs ({counts['failed']} failed)")
    return counts


def _render_one(job: tuple[str, str, int]) -> bool:
    """One SVG -> PNG (written atomically); False when the SVG does not render."""
    import io

    import cairosvg
    from PIL import Image

    svg, png, px = job
    try:
        raw = cairosvg.svg2png(url=svg, output_width=px, unsafe=False)  # height keeps the aspect ratio
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Exception:  # malformed or unsupported SVG: counted as failed by the caller
        return False
    image.thumbnail((px, px))
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image.getchannel("A") if "A" in image.getbands() else None)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{png}.partial-{os.getpid()}"
    canvas.save(partial, format="PNG")
    os.replace(partial, png)
    return True


def png_dir(svg_root: Path) -> Path:
    """Where `render_tree` puts the PNGs of an SVG tree by default: a `png` folder beside it."""
    return Path(svg_root).parent / "png"


def _category(folder: str, depth: int) -> str:
    return "/".join(Path(folder).parts[:depth]) or "root"


def _unique(values: list[str]) -> list[str]:
    seen, out = set(), []
    for v in values:
        if v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


def _default_root() -> Path:
    from core import assets

    return assets.openclipart_svg_dir()
