"""A page to look at what the model recommends: sampled notes beside their top-k related notes.

For `--sample` notes drawn with `--seed` from the index, the page shows the note's image and title
and, in a row beside it, its `--k` nearest notes from the index (the note itself excluded) with
their images, titles and scores. A related note whose category equals the query's (when the corpus
has categories, e.g. the synthetic corpus's `t<topic>/v<variant>`) is framed in green and badged
"same category"; each row ends with its share of such notes, and the header gives the share over
the page. Images are inlined as small PNG thumbnails: the file is self-contained (no network).

    python -m rayjobs.browse --index runs/index/smoke --data runs/data/synthetic-smoke --out runs/index/smoke/page.html
    ray job submit --working-dir . -- python -m rayjobs.browse --index /mnt/shared/index/base \
        --data /mnt/shared/data/qilin --out /mnt/shared/index/base/page.html --sample 50
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

import numpy as np

from core.related_index import IndexDirError, load_index_dir

NOTE_COLUMNS = ["note_id", "title", "image", "image_uri", "category"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #555; font-size: 13px; margin-bottom: 16px; }
.row { display: flex; gap: 10px; align-items: flex-start; border-top: 1px solid #ddd; padding: 10px 0; }
.card { width: 112px; font-size: 12px; border: 3px solid transparent; border-radius: 6px; padding: 3px; }
.card.query { border-color: #333; background: #f4f4f4; }
.card.same { border-color: #2a9d3a; }
.card img, .card .noimg { width: 104px; height: 104px; object-fit: contain; display: block; background: #fafafa; }
.card .noimg { display: flex; align-items: center; justify-content: center; color: #999; }
.title { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.cat, .score { color: #666; }
.badge { color: #fff; background: #2a9d3a; border-radius: 3px; padding: 0 3px; font-size: 11px; }
.share { align-self: center; font-size: 13px; color: #333; min-width: 90px; }
"""

SCRIPT = """
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img")];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesBroken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
});
"""


def thumbnail_uri(image: bytes | None, image_uri: str | None, size: int) -> str | None:
    """A `data:image/png;base64,...` thumbnail of a note's image, or None when it has none that decodes."""
    from core.data.images import decode_image, encode_png, read_uri

    data = image
    if data is None and image_uri:
        try:
            data = read_uri(image_uri)
        except OSError:
            return None
    img, _, _ = decode_image(data)
    if img is None:
        return None
    img.thumbnail((size, size))
    return "data:image/png;base64," + base64.b64encode(encode_png(img)).decode()


def _card(note: dict, css: str, extra: str, size: int) -> str:
    uri = thumbnail_uri(note.get("image"), note.get("image_uri"), size)
    title = html.escape(note.get("title") or f"note {note['note_id']}")
    picture = (f'<img src="{uri}" alt="{title}">' if uri else '<div class="noimg">no image</div>')
    cat = html.escape(note.get("category") or "")
    return (f'<div class="card {css}" data-note-id="{note["note_id"]}">{picture}<div class="title" title="{title}">'
            f'{title}</div><div class="cat">{cat}</div>{extra}</div>')


def build_page(index_dir: str, data_dir: str, *, sample: int = 12, k: int = 8, seed: int = 0, thumb: int = 96) -> str:
    """The HTML page (module docstring) as a string."""
    from core.evaluation import read_notes

    catalog = load_index_dir(index_dir)
    k = max(1, min(k, len(catalog.ids) - 1))
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(catalog.ids, size=min(sample, len(catalog.ids)), replace=False))
    related = catalog.related(queries, k)
    wanted = set(queries.tolist()) | {nid for row in related for nid, _ in row}
    table = read_notes(data_dir, note_ids=sorted(wanted), columns=NOTE_COLUMNS)
    notes = {row["note_id"]: row for row in table.to_pylist()}
    rows, same_total, marked_total = [], 0, 0
    for qid, hits in zip(queries.tolist(), related):
        query = notes.get(qid, {"note_id": qid})
        cells, same = [_card(query, "query", "", thumb)], 0
        has_category = bool(query.get("category"))
        for nid, score in hits:
            note = notes.get(nid, {"note_id": nid})
            is_same = has_category and note.get("category") == query.get("category")
            same += is_same
            badge = ' <span class="badge">same category</span>' if is_same else ""
            cells.append(_card(note, "related same" if is_same else "related", f'<div class="score">{score:.3f}{badge}</div>',
                               thumb))
        share = f"{same}/{len(hits)} same category" if has_category else "no category"
        if has_category:
            same_total, marked_total = same_total + same, marked_total + len(hits)
        rows.append(f'<div class="row" data-query="{qid}">{"".join(cells)}<div class="share">{share}</div></div>')
    m = catalog.manifest
    overall = f"{same_total}/{marked_total} related notes share the query's category" if marked_total else \
        "the corpus has no categories"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Related notes: {html.escape(Path(index_dir).name)}"
            f"</title><style>{STYLE}</style></head><body><h1>Related notes</h1>"
            f'<div class="meta">{len(queries)} sampled notes (seed {seed}), top {k} each from the {m.index} index of '
            f"{m.count} notes (dim {m.dim}, export {html.escape(m.export_hash[:12])}); {overall}. "
            f"Green frame: same category as the query.</div>{''.join(rows)}<script>{SCRIPT}</script></body></html>")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.browse", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory written by python -m rayjobs.embed")
    p.add_argument("--data", required=True, help="prepared data directory of the indexed notes (titles, images)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--sample", type=int, default=12, help="notes to show")
    p.add_argument("--k", type=int, default=8, help="related notes per sampled note")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.data.schema import DataError

    if args.sample < 1 or args.k < 1 or args.thumb < 8:
        print("rayjobs.browse: error: --sample and --k must be >= 1, --thumb >= 8", file=sys.stderr)
        return 2
    if "://" not in args.data and not (Path(args.data) / "notes.parquet").exists():
        print(f"rayjobs.browse: error: --data {args.data}: notes.parquet not found "
              "(prepare it with python -m rayjobs.prepare_data)", file=sys.stderr)
        return 2
    try:
        page = build_page(args.index, args.data, sample=args.sample, k=args.k, seed=args.seed, thumb=args.thumb)
    except (IndexDirError, DataError) as err:
        print(f"rayjobs.browse: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
