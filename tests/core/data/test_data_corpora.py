"""Corpus adapters on small fixtures, and `prepare` with planted bad rows."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.data import schema
from core.data.corpora import Corpus, build_corpus
from core.data.prepare import prepare
from rayjobs.prepare_data import main


def png(mode="RGB", size=(8, 8), fmt="PNG"):
    buf = io.BytesIO()
    colour = {"RGB": (200, 10, 10), "CMYK": (0, 200, 200, 0), "LA": (100, 128), "RGBA": (1, 2, 3, 128)}.get(mode, 3)
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def assert_leak_free(train, val, test, held_out_queries=True):
    """Train, validation and test query sets are disjoint, and no training note is a held-out
    query (as query or target), nor a validation target a test query. `held_out_queries`: both
    held-out splits must have queries (False for fixtures with a handful of pairs)."""
    q_train, q_val, q_test = (set(t["query_id"].to_pylist()) for t in (train, val, test))
    assert not held_out_queries or (q_val and q_test), "both held-out splits have queries"
    assert not (q_train & q_val or q_train & q_test or q_val & q_test)
    assert not set(train["target_id"].to_pylist()) & (q_val | q_test)
    assert not set(val["target_id"].to_pylist()) & q_test


def check_prepared(out, report, held_out_queries=True):
    for name in (schema.NOTES_FILE, schema.EVENTS_FILE, *schema.PAIRS_FILES.values(), schema.REPORT_FILE):
        assert (out / name).is_file(), name
    notes = pq.read_table(out / schema.NOTES_FILE)
    assert notes.schema.equals(schema.NOTE_SCHEMA)
    test = pq.read_table(out / "pairs_test.parquet")
    train = pq.read_table(out / "pairs_train.parquet")
    assert test.column_names == ["query_id", "target_id", "score", "short_query", "short_target"]
    assert_leak_free(train, pq.read_table(out / "pairs_val.parquet"), test, held_out_queries)
    assert json.loads((out / schema.REPORT_FILE).read_text())["counts"] == report["counts"]
    return notes, train, test


def test_synthetic_is_seeded_and_image_carries_the_cluster(tmp_path):
    a, b = build_corpus("synthetic", num_notes=48, seed=5), build_corpus("synthetic", num_notes=48, seed=5)
    assert a.notes.equals(b.notes) and a.events.equals(b.events)
    short = [r for r in a.notes.to_pylist() if not r["content"]]
    assert short and all(r["topics"] == [] for r in short)
    report = prepare("synthetic", tmp_path, num_notes=80, seed=1)
    notes, train, test = check_prepared(tmp_path, report)
    assert report["counts"]["notes_with_image"] == 80 and train.num_rows > 0 and test.num_rows > 0
    assert report["counts"]["short_notes"] > 0


def test_tuxpaint_stamps(tmp_path):
    from core import assets

    try:
        assets.tuxpaint_stamps_dir()
    except assets.AssetMissingError:
        pytest.skip("Tux Paint stamps not installed: python -m rayjobs.fetch_assets")
    report = prepare("tuxpaint", tmp_path, num_notes=120, seed=0, short_fraction=0.5)
    notes, train, test = check_prepared(tmp_path, report)
    assert report["skipped"]["source"]["svg_not_supported"] > 0  # SVGs counted, not silently lost
    rows = notes.to_pylist()
    long = [r for r in rows if r["topics"]]
    assert long and all(r["category"] == "/".join(r["topics"][:2]) for r in long)
    assert all(r["image"] for r in rows)
    assert Image.open(io.BytesIO(rows[0]["image"])).mode == "RGB"  # RGBA/LA/P converted


def test_tuxpaint_on_a_tiny_tree(tmp_path):
    root = tmp_path / "stamps"
    for cat, names in {"animals/birds": ["owl", "duck"], "food/fruit": ["apple", "pear"]}.items():
        (root / cat).mkdir(parents=True)
        for n in names:
            (root / cat / f"{n}.png").write_bytes(png("RGBA"))
            (root / cat / f"{n}.txt").write_text(f"A {n}.\nfr.utf8=Un {n}.\n")
    (root / "food/fruit/kiwi.svg").write_text("<svg/>")
    c = build_corpus("tuxpaint", input=str(root), short_fraction=0.0)
    rows = c.notes.to_pylist()
    assert [r["title"] for r in rows] == ["duck", "owl", "apple", "pear"]
    assert rows[0]["content"] == "A duck." and rows[0]["topics"] == ["animals", "birds"]
    assert c.report.skipped["source"]["svg_not_supported"] == 1


def test_movielens_text_only(tmp_path):
    report = prepare("movielens", tmp_path, num_notes=150, top_t=5)
    notes, train, test = check_prepared(tmp_path, report)
    assert report["counts"]["notes_with_image"] == 0
    assert notes.filter(pa.compute.equal(notes["note_id"], 1)).to_pylist()[0]["title"] == "Toy Story"
    assert train.num_rows > 0


def test_movielens_consecutive_events(tmp_path):
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                           "1\tA\t1990\tDrama\n2\tB\t1991\tComedy Drama\n3\tC\t\tHorror\n")
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                            "5\t2\t4\t20\n5\t1\t3\t10\n5\t3\t3\t30\n6\t1\t1\t5\n")
    c = build_corpus("movielens", input=str(tmp_path))
    assert [(r["viewed_note_id"], r["clicked_note_id"]) for r in c.events.to_pylist()] == [(1, 2), (2, 3)]
    assert c.notes.to_pylist()[1]["topics"] == ["Comedy", "Drama"]
    assert c.notes.to_pylist()[2]["content"] is None


def write_qilin(root, notes_rows, sessions):
    (root / "notes").mkdir(parents=True)
    (root / "recommendation_train").mkdir()
    pq.write_table(pa.table(notes_rows), root / "notes" / "train-00000-of-00001.parquet")
    detail = pa.struct([("note_idx", pa.int64()), ("click", pa.int64()), ("position", pa.int64())])
    table = pa.table({
        "request_idx": pa.array([s[0] for s in sessions], pa.int64()),
        "session_idx": pa.array([0] * len(sessions), pa.int64()),
        "user_idx": pa.array([s[1] for s in sessions], pa.int64()),
        "request_timestamp": pa.array([s[2] for s in sessions], pa.int64()),
        "rec_results": pa.array([[d[0] for d in s[3]] for s in sessions], pa.list_(pa.int64())),
        "rec_result_details_with_idx": pa.array([[{"note_idx": d[0], "click": d[1], "position": i} for i, d in enumerate(s[3])] for s in sessions],
                                                pa.list_(detail)),
    })
    pq.write_table(table, root / "recommendation_train" / "train-00000-of-00001.parquet")


def test_qilin_importer(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(png("RGB", fmt="JPEG"))
    write_qilin(tmp_path / "qilin", {
        "note_idx": pa.array([0, 1, 2, 3], pa.int64()),
        "note_title": ["夏日穿搭", "露营装备", "", "咖啡"],
        "note_content": ["#穿搭[话题]# 清爽", "帐篷推荐", "只有内容", "拿铁"],
        "note_type": [1, 1, 2, 1],
        "taxonomy1_id": ["时尚", "户外", "户外", "美食"],
        "taxonomy2_id": ["穿搭", "露营", None, "饮品"],
        "image_path": pa.array([["a.jpg"], [], None, ["missing.jpg"]], pa.list_(pa.string())),
    }, [
        (10, 7, 100, [(0, 1), (1, 0), (2, 1)]),  # user 7 clicks 0 then 2
        (11, 7, 200, [(3, 1)]),                  # ... then 3
        (12, 8, 150, [(1, 1), (0, 1)]),          # user 8 clicks 1 then 0
    ])
    c = build_corpus("qilin", input=str(tmp_path / "qilin"), image_root=str(images))
    assert [(r["user_id"], r["viewed_note_id"], r["clicked_note_id"]) for r in c.events.to_pylist()] == [(7, 0, 2), (7, 2, 3), (8, 1, 0)]
    rows = c.notes.to_pylist()
    assert rows[0]["image_uri"] == str(images / "a.jpg") and rows[1]["image_uri"] is None
    assert rows[0]["category"] == "时尚/穿搭" and rows[2]["category"] == "户外"
    report = prepare(c, tmp_path / "out", test_fraction=0.3)
    check_prepared(tmp_path / "out", report, held_out_queries=False)  # 3 pairs: too few for both splits
    assert report["skipped"]["images"] == {"unreadable_uri": 1}
    assert report["counts"]["notes_with_image"] == 1


def test_planted_bad_rows_are_counted(tmp_path):
    good = png()
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, format="PNG")
    truncated = noisy.getvalue()[: len(noisy.getvalue()) * 3 // 5]  # header intact, pixel data cut
    bomb = png("L", size=(9000, 9000))  # 81 MP > MAX_IMAGE_PIXELS: refused before decoding
    notes = pa.table({
        "note_id": pa.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, None], pa.int64()),
        "title": pa.array([b"ok one", b"ok two", b"cmyk", b"palette", b"la", b"corrupt", b"truncated", b"zero",
                           b"bomb", b"\xff\xfe bad utf8", b"", b"text only", b"dup of 3", b"no id"], pa.binary()),
        "content": [""] * 14,
        "image": pa.array([good, good, png("CMYK", fmt="JPEG"), png("P"), png("LA"), b"not an image", truncated, b"",
                           bomb, good, good, None, good, good], pa.binary()),
    })
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 11]
    rng = np.random.default_rng(0)
    ev = {"user_id": rng.integers(0, 20, 300), "viewed_note_id": rng.choice(ids, 300), "clicked_note_id": rng.choice(ids, 300),
          "ts": rng.random(300) * 100}
    bad_events = pa.table({"user_id": pa.array([1, 1, 1, 1, None], pa.int64()), "viewed_note_id": [0, 0, 0, 99, 0],
                           "clicked_note_id": [1, 1, 42, 1, 1], "ts": [float("nan"), -5.0, 1.0, 1.0, 1.0]})
    events = pa.concat_tables([pa.table(ev).cast(bad_events.schema), bad_events])
    report = prepare(Corpus("planted", notes, events), tmp_path, test_fraction=0.3)
    sk, conv = report["skipped"], report["converted"]
    assert sk["notes"] == {"duplicate_note_id": 1, "empty_text": 1, "invalid_utf8": 1, "missing_note_id": 1}
    assert sk["images"] == {"corrupt": 1, "too_large": 1, "truncated": 1, "zero_bytes": 1}
    assert conv["images"] == {"CMYK_to_RGB": 1, "LA_to_RGB": 1, "P_to_RGB": 1}
    assert sk["events"] == {"missing_id": 1, "nan_timestamp": 1, "negative_timestamp": 1, "unknown_note": 2}
    c = report["counts"]
    assert (c["notes_in"], c["notes_out"], c["notes_with_image"]) == (14, 10, 5)
    assert c["events_out"] == 300
    check_prepared(tmp_path, report)


def test_cli_help_and_unreadable_file_fails_fast(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    assert "ray job submit" in main.__globals__["__doc__"]
    bad = tmp_path / "qilin"
    (bad / "notes").mkdir(parents=True)
    (bad / "notes" / "x.parquet").write_bytes(b"garbage, not parquet")
    assert main(["--corpus", "qilin", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.parquet" in err
    assert main(["--corpus", "synthetic", "--out", str(tmp_path / "s"), "--num-notes", "40", "--top-t", "3"]) == 0
    assert "prepared synthetic" in capsys.readouterr().out


def _bag_of_words(notes, dim: int = 512) -> np.ndarray:
    out = np.zeros((len(notes), dim))
    for i, note in enumerate(notes):
        words = " ".join([note["title"] or "", note["content"] or "", *(note["topics"] or [])]).lower().split()
        for w in words:
            out[i, sum(map(ord, w)) * 2654435761 % dim] += 1.0
    return out


def _shape_colour(notes) -> np.ndarray:
    """Mean RGB of the drawn shape (the saturated pixels): what the image says about the note."""
    out = np.zeros((len(notes), 3))
    for i, note in enumerate(notes):
        px = np.asarray(Image.open(io.BytesIO(note["image"])).convert("RGB"), dtype=float)
        shape = px[(px.max(axis=2) - px.min(axis=2)) > 80]
        out[i] = shape.mean(axis=0) / 255.0 if len(shape) else 0.0
    return out


def test_synthetic_short_notes_lose_recall_without_the_image(tmp_path):
    """The property the synthetic corpus exists for: text alone serves long queries but leaves
    short ones near chance (their text is a shared filler title), while what the image shows
    (here only the shape's colour) recovers short queries. Seeded, so the figures are fixed (test
    split, reduced `targets` pool of 68): text R@10 0.37 all / 0.20 short-query; image colour 0.45
    short-query (20 short queries)."""
    import torch

    from core.evaluation import build_protocol, evaluate_embeddings

    prepare("synthetic", tmp_path, num_notes=400, seed=0)
    notes = pq.read_table(tmp_path / "notes.parquet").to_pylist()
    ids = np.array([n["note_id"] for n in notes])
    protocol = build_protocol(pq.read_table(tmp_path / "pairs_test.parquet").to_pandas(), pool="targets")
    rng = np.random.default_rng(0)

    def recall(features):
        emb = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        emb = emb + rng.normal(scale=1e-4, size=emb.shape)  # no exact ties (identical titles)
        metrics, _ = evaluate_embeddings(ids, torch.tensor(emb, dtype=torch.float32), protocol, [10])
        return metrics

    text, image = recall(_bag_of_words(notes)), recall(_shape_colour(notes))
    assert text["num"]["short_query"] >= 10, text["num"]
    assert text["all"]["R@10"] >= text["short_query"]["R@10"] + 0.15, text  # text works, except on short notes
    assert image["short_query"]["R@10"] >= text["short_query"]["R@10"] + 0.2, (text, image)


def clipart_svg(title, keywords=(), description="", colour="red"):
    bag = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            f'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            f'width="40" height="20"><metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>'
            f'<dc:description>{description}</dc:description><dc:subject><rdf:Bag>{bag}</rdf:Bag></dc:subject>'
            f'<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>'
            f'</cc:Work></rdf:RDF></metadata><rect width="40" height="20" fill="{colour}"/></svg>')


def test_openclipart_on_a_tiny_tree(tmp_path):
    """Metadata titles/keywords, folders as topics and category, a linked item in two categories,
    patterns dropped, an SVG that does not render counted, rendering resumable."""
    from core.data.corpora.openclipart import build_openclipart, render_tree

    svg = tmp_path / "svg"
    for folder in ("animals/birds", "food/fruit", "special/patterns", "unsorted"):
        (svg / folder).mkdir(parents=True)
    (svg / "animals/birds/owl_01.svg").write_text(clipart_svg("night owl", ["bird", "owl"], "An owl at night."))
    (svg / "animals/birds/duck.svg").write_text(clipart_svg("", [], "", "yellow"))  # no title: the file name
    (svg / "food/fruit/apple.svg").write_text(clipart_svg("red apple", ["fruit"]))
    (svg / "food/fruit/owl_01.svg").symlink_to("../../animals/birds/owl_01.svg")  # also in food/fruit
    (svg / "special/patterns/dots.svg").write_text(clipart_svg("dots"))
    (svg / "unsorted/broken.svg").write_text("<svg><rect")
    counts = render_tree(svg, tmp_path / "png", px=32, workers=1, progress=lambda line: None)
    assert counts == {"rendered": 3, "cached": 0, "failed": 1}
    assert Image.open(tmp_path / "png/food/fruit/apple.png").size == (32, 16)  # longest side px, aspect kept
    assert render_tree(svg, tmp_path / "png", px=32, workers=1, progress=lambda line: None)["cached"] == 3

    c = build_openclipart(input=str(svg), short_fraction=0.0, num_users=20)
    rows = {r["source_id"]: r for r in c.notes.to_pylist()}
    assert sorted(rows) == ["animals/birds/duck.svg", "animals/birds/owl_01.svg", "food/fruit/apple.svg"]
    owl = rows["animals/birds/owl_01.svg"]
    assert (owl["title"], owl["content"], owl["topics"]) == ("night owl", "An owl at night.", ["bird", "owl", "animals", "birds"])
    assert owl["category"] == "animals/birds" and rows["animals/birds/duck.svg"]["title"] == "duck"
    assert Image.open(io.BytesIO(rows["food/fruit/apple.svg"]["image"])).mode == "RGB"
    assert c.report.skipped["source"] == {"pattern_or_gradient": 1, "not_rendered": 1}
    assert c.report.info["openclipart"]["notes_in_several_categories"] == 1


def test_clicks_with_extra_categories():
    """Without extra categories the log is the single-category one, bit for bit; a note in two
    categories is clicked from views in both."""
    from core.data.corpora.synthetic import simulate_clicks

    cats = ["a"] * 5 + ["b"] * 5
    kw = dict(num_users=40, events_per_user=20, seed=3, p_related=1.0)
    plain = simulate_clicks(cats, **kw)
    assert simulate_clicks(cats, extra_categories=[[]] * 10, **kw).equals(plain)
    graded = simulate_clicks(cats, extra_categories=[["b"]] + [[]] * 9, **kw)  # note 0 is in a and b
    pairs = list(zip(graded["viewed_note_id"].to_pylist(), graded["clicked_note_id"].to_pylist()))
    assert {v for v, c in pairs if c == 0} & set(range(5, 10)), "note 0 clicked after a view in b"
    assert not {v for v, c in pairs if c in range(1, 5)} & set(range(5, 10))  # other a-notes only from a
    with pytest.raises(ValueError, match="extra_categories has 2 entries for 10 notes"):
        simulate_clicks(cats, extra_categories=[[], []], **kw)
