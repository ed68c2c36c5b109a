"""rayjobs.browse: the related-notes page, rendered in real headless Chromium (screenshot, images, marks)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from core.related_index import export_hash, finalize_embeddings, load_index_dir, write_index_dir
from rayjobs import browse
from tests.browser import dump_dom, requires_chromium, screenshot


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A tiny model's exact index of the synthetic corpus, embedded in-process (the Ray job is test_embed's)."""
    from core.data.pipeline import NotePreprocessor
    from core.embedding import embed_notes_local
    from core.evaluation import preprocess_notes_local, read_notes
    from tests.core.test_evaluation import tiny_eval_setup

    run = tiny_eval_setup(tmp_path_factory.mktemp("browse"), num_notes=40)
    notes = preprocess_notes_local(read_notes(run.data_dir), NotePreprocessor(run.cfg.model))
    ids, raw = embed_notes_local(run.model, notes, "cpu", batch_size=20)
    order = np.argsort(ids.numpy())
    out = Path(run.data_dir).parent / "index"
    write_index_dir(out, ids.numpy()[order], finalize_embeddings(raw.numpy()[order]), export=run.export_dir,
                    export_hash=export_hash(run.export_dir), index_kind="exact", data=run.data_dir)
    return out, run


def test_page_lists_each_sample_with_its_related_notes_and_marks(index, tmp_path):
    out, run = index
    page = tmp_path / "page.html"
    assert browse.main(["--index", str(out), "--data", run.data_dir, "--out", str(page), "--sample", "5", "--k", "4"]) == 0
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    catalog = load_index_dir(out)
    rows = re.findall(r'<div class="row" data-query="(\d+)">(.*?)<div class="share">(\d+)/4 same category</div>', text)
    assert len(rows) == 5
    import pyarrow.parquet as pq

    category = dict(zip(*pq.read_table(f"{run.data_dir}/notes.parquet", columns=["note_id", "category"]).to_pydict().values()))
    for qid, cells, same in rows:
        shown = [int(n) for n in re.findall(r'class="card related[^"]*" data-note-id="(\d+)"', cells)]
        assert shown == [nid for nid, _ in catalog.related([int(qid)], 4)[0]]  # the index's top-k, in order
        marked = [int(n) for n in re.findall(r'class="card related same" data-note-id="(\d+)"', cells)]
        assert marked == [n for n in shown if category[n] == category[int(qid)]]
        assert int(same) == len(marked)


@requires_chromium
def test_page_renders_in_headless_chromium_with_images_and_marks(index, tmp_path):
    out, run = index
    page = tmp_path / "page.html"
    assert browse.main(["--index", str(out), "--data", run.data_dir, "--out", str(page), "--sample", "6", "--k", "5",
                        "--seed", "3"]) == 0
    png = tmp_path / "page.png"
    shot = screenshot(page, png, tmp_path / "profile1", size="1000,1200")
    assert png.exists(), shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    dom = dump_dom(page, tmp_path / "profile2", budget_ms=3000)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    broken = re.search(r'data-images-broken="(\d+)"', dom)
    assert loaded and broken, "the page's load handler did not run"
    assert int(loaded.group(1)) == 6 * (1 + 5) and int(broken.group(1)) == 0  # every synthetic note has an image
    assert dom.count('class="card query"') == 6
    assert dom.count('class="card related same"') == dom.count('class="badge"') > 0  # marks present

    from PIL import Image

    shot_px = np.asarray(Image.open(png).convert("RGB")).astype(int)
    green = (np.abs(shot_px - np.array([0x2A, 0x9D, 0x3A])).sum(axis=2) < 30).sum()
    assert green > 200  # the green frames and badges are painted, not only in the DOM
