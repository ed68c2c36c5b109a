"""Bad inputs through the real entrypoint (`python -m rayjobs.prepare_data --corpus parquet`):
each bad row is skipped and counted with its reason in data_report.json (nothing vanishes
silently), and each unusable file stops the job with one line naming the file, row and field."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.reliability.conftest import PY, REPO, smoke_args, subprocess_env


def png(color=(200, 30, 30), size=(8, 8), mode="RGB") -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(mode="CMYK") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (16, 16), (10, 200, 30, 0) if mode == "CMYK" else (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A 67-byte-header PNG that claims side x side pixels (a decompression bomb, built cheaply:
    the IHDR chunk is rewritten with a valid CRC; no pixels are ever allocated)."""
    data = bytearray(png(size=(1, 1)))
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def palette_png() -> bytes:
    from PIL import Image

    img = Image.new("P", (8, 8), 3)
    img.putpalette([i % 256 for i in range(768)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {  # note id -> (image bytes, how data_report.json must account for it)
    100: (b"this is not an image at all", ("skipped", "images", "corrupt")),
    101: (jpeg("RGB")[:200], ("skipped", "images", "truncated")),
    102: (b"", ("skipped", "images", "zero_bytes")),
    103: (bomb_png(), ("skipped", "images", "too_large")),
    104: (jpeg("CMYK"), ("converted", "images", "CMYK_to_RGB")),
    105: (palette_png(), ("converted", "images", "P_to_RGB")),
}
N_GOOD = 40


def write_corpus(root: Path) -> dict:
    """notes.parquet + events.parquet with every kind of bad row; returns the expected report."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids, titles, contents, images = [], [], [], []
    for i in range(N_GOOD):
        ids.append(i), titles.append(f"note {i} about topic {i % 5}".encode()), contents.append(b"some words here")
        images.append(png(color=(i * 5 % 256, 40, 90)))
    for nid, (data, _) in BAD_IMAGES.items():
        ids.append(nid), titles.append(f"image case {nid}".encode()), contents.append(b"text"), images.append(data)
    ids.append(200), titles.append(b"caf\xe9 latin-1 bytes"), contents.append(b"x"), images.append(None)  # not UTF-8
    ids.append(201), titles.append(b""), contents.append(b"   "), images.append(None)  # no text at all
    ids.append(5), titles.append(b"a second note 5"), contents.append(b"dup"), images.append(None)  # duplicate id
    notes = pa.table({"note_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.binary()),
                      "content": pa.array(contents, pa.binary()), "image": pa.array(images, pa.binary())})
    pq.write_table(notes, root / "notes.parquet")

    usable = list(range(N_GOOD)) + [nid for nid in BAD_IMAGES]
    users, viewed, clicked, ts = [], [], [], []
    for u in range(120):
        a, b = rng.choice(usable, size=2, replace=False)
        users.append(u), viewed.append(int(a)), clicked.append(int(b)), ts.append(float(u))
    bad_events = [(1000, 1, 2, float("nan")), (1001, 3, 4, -5.0), (1002, 1, 99999, 1.0), (1003, 88888, 2, 2.0)]
    for u, a, b, t in bad_events:
        users.append(u), viewed.append(a), clicked.append(b), ts.append(t)
    events = pa.table({"user_id": pa.array(users, pa.int64()), "viewed_note_id": pa.array(viewed, pa.int64()),
                       "clicked_note_id": pa.array(clicked, pa.int64()), "ts": pa.array(ts, pa.float64())})
    pq.write_table(events, root / "events.parquet")
    expected = {("skipped", "notes", "invalid_utf8"): 1, ("skipped", "notes", "empty_text"): 1,
                ("skipped", "notes", "duplicate_note_id"): 1, ("skipped", "events", "nan_timestamp"): 1,
                ("skipped", "events", "negative_timestamp"): 1, ("skipped", "events", "unknown_note"): 2}
    for _, where in BAD_IMAGES.values():
        expected[where] = 1
    return expected


def prepare_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "rayjobs.prepare_data", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcorpus")
    expected = write_corpus(root / "in")
    proc = prepare_cli("--corpus", "parquet", "--input", str(root / "in"), "--out", str(root / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, expected, json.loads((root / "out" / "data_report.json").read_text())


def test_every_bad_row_is_counted_with_its_reason(bad_corpus):
    _, expected, report = bad_corpus
    for (kind, stage, reason), n in expected.items():
        assert report[kind].get(stage, {}).get(reason) == n, (kind, stage, reason, report[kind])


def test_nothing_is_dropped_silently(bad_corpus):
    """Rows in = rows out + rows skipped, for notes and for events."""
    _, _, report = bad_corpus
    c, s = report["counts"], report["skipped"]
    assert c["notes_in"] == c["notes_out"] + sum(s["notes"].values())
    assert c["events_in"] == c["events_out"] + sum(s["events"].values())
    assert c["notes_out"] == N_GOOD + len(BAD_IMAGES)  # bad images leave text-only notes, not gaps


def test_prepared_bad_corpus_has_only_decodable_rgb_images(bad_corpus):
    from core.data.images import decode_image

    root, _, _ = bad_corpus
    notes = pq.read_table(root / "out" / "notes.parquet").to_pylist()
    for note in notes:
        if note["image"] is not None:
            img, reason, mode = decode_image(note["image"])
            assert img is not None and mode == "RGB", (note["note_id"], reason, mode)
    by_id = {n["note_id"]: n for n in notes}
    assert all(by_id[nid]["image"] is None for nid in (100, 101, 102, 103))
    assert all(by_id[nid]["image"] is not None for nid in (104, 105))
    assert by_id[5]["title"] == "note 5 about topic 0"  # first row of a duplicated id wins


def _corpus_with(tmp_path, notes: pa.Table | None = None, events: pa.Table | None = None) -> Path:
    root = tmp_path / "in"
    write_corpus(root)
    if notes is not None:
        pq.write_table(notes, root / "notes.parquet")
    if events is not None:
        pq.write_table(events, root / "events.parquet")
    return root


def _good_events():
    return pa.table({"user_id": [1, 2], "viewed_note_id": [1, 2], "clicked_note_id": [2, 1]})


@pytest.mark.parametrize("case, needles", [
    ("notes_missing_id", ["notes.parquet", "required column 'note_id' is missing"]),
    ("notes_renamed_column", ["notes.parquet", "unknown column 'titel'", "did you mean 'title'"]),
    ("notes_wrong_type", ["notes.parquet", "row 2", "field 'note_id'", "'two'"]),
    ("events_wrong_type", ["events.parquet", "row 1", "field 'ts'", "'yesterday'"]),
    ("events_renamed_column", ["events.parquet", "unknown column 'clicked_id'", "did you mean 'clicked_note_id'"]),
    ("events_missing_column", ["events.parquet", "required column 'user_id' is missing"]),
    ("notes_not_parquet", ["notes.parquet", "cannot read Parquet"]),
    ("notes_missing_file", ["notes.parquet", "not found"]),
    ("no_valid_notes", ["no valid notes left", "invalid_utf8"]),
])
def test_unusable_file_fails_with_one_line_naming_file_row_field(tmp_path, case, needles):
    ids = pa.array([1, 2, 3], pa.int64())
    tables = {
        "notes_missing_id": dict(notes=pa.table({"title": ["a", "b"]})),
        "notes_renamed_column": dict(notes=pa.table({"note_id": ids, "titel": ["a", "b", "c"]})),
        "notes_wrong_type": dict(notes=pa.table({"note_id": ["1", "2", "two"], "title": ["a", "b", "c"]})),
        "events_wrong_type": dict(events=_good_events().append_column("ts", pa.array(["1.5", "yesterday"]))),
        "events_renamed_column": dict(events=pa.table({"user_id": [1], "viewed_note_id": [1], "clicked_id": [2]})),
        "events_missing_column": dict(events=pa.table({"viewed_note_id": [1], "clicked_note_id": [2]})),
        "no_valid_notes": dict(notes=pa.table({"note_id": ids, "title": pa.array([b"\xff", b"\xfe", b"\xc3"], pa.binary())})),
    }
    root = _corpus_with(tmp_path, **tables.get(case, {}))
    if case == "notes_not_parquet":
        (root / "notes.parquet").write_bytes(b"PAR1 but not really" * 10)
    if case == "notes_missing_file":
        (root / "notes.parquet").unlink()
    proc = prepare_cli("--corpus", "parquet", "--input", str(root), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out" / "pairs_train.parquet").exists()


def test_training_refuses_pairs_that_reference_missing_notes(rel_data, tmp_path):
    """A prepared directory edited by hand: the training join would drop such pairs silently,
    so `rayjobs.train` refuses it before Ray starts, naming the file, row and field."""
    data = tmp_path / "data"
    shutil.copytree(rel_data, data)
    pairs = pq.read_table(data / "pairs_train.parquet")
    target = pairs["target_id"].to_pylist()
    target[7] = 999_999
    pairs = pairs.set_column(pairs.column_names.index("target_id"), "target_id", pa.array(target, pa.int64()))
    pq.write_table(pairs, data / "pairs_train.parquet")
    proc = subprocess.run([PY, "-m", "rayjobs.train", *smoke_args(tmp_path / "runs", data, "badpairs")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "pairs_train.parquet", "row 7", "field 'target_id'", "note 999999 is not in notes.parquet")
    assert not (tmp_path / "runs" / "badpairs").exists()


def test_training_runs_on_the_prepared_bad_corpus(ray_local, bad_corpus, tmp_path):
    """What survives the bad rows is a usable corpus: a (local-mode) training run on it finishes,
    with text-only notes where images were refused, and reports a finite loss."""
    import math

    from rayjobs.train import run_training
    from tests.reliability.conftest import smoke_cfg

    root, _, report = bad_corpus
    assert report["counts"]["pairs_train"] >= 4, report["counts"]
    final = run_training(smoke_cfg(tmp_path / "runs", root / "out", "bad-corpus", "train.num_workers=0",
                                   "train.deepspeed=zero0", "train.batch_size=2", "train.max_steps=2"))
    assert final["steps"] == 2 and math.isfinite(final["loss"])


def _qilin_dir(tmp_path, bad: str) -> Path:
    """A two-file Qilin notes folder plus one sessions file, with one bad value planted."""
    root = tmp_path / "qilin"
    (root / "notes").mkdir(parents=True)
    (root / "recommendation_train").mkdir()
    second = ["3", "x4" if bad == "note_idx" else "4"]
    for i, ids in enumerate((["1", "2"], second)):
        pq.write_table(pa.table({"note_idx": ids, "note_title": ["t"] * 2, "note_content": ["c"] * 2}),
                       root / "notes" / f"part-{i}.parquet")
    detail = pa.struct([("note_idx", pa.string()), ("click", pa.int64())])
    items = [[{"note_idx": "1", "click": 1}], [{"note_idx": "2", "click": 1}, {"note_idx": "n3" if bad == "detail" else "3", "click": 1}]]
    pq.write_table(pa.table({
        "request_idx": pa.array([10, 11], pa.int64()),
        "user_idx": pa.array(["7", "u7" if bad == "user_idx" else "7"]),
        "request_timestamp": pa.array([100, 200], pa.int64()),
        "rec_result_details_with_idx": pa.array(items, pa.list_(detail)),
    }), root / "recommendation_train" / "part-0.parquet")
    return root


@pytest.mark.parametrize("bad, needles", [
    ("note_idx", ["notes/part-1.parquet: row 1, field 'note_idx': 'x4' is not a valid int64"]),
    ("user_idx", ["recommendation_train/part-0.parquet: row 1, field 'user_idx': 'u7' is not a valid int64"]),
    ("detail", ["part-0.parquet: row 1, field 'rec_result_details_with_idx.note_idx': 'n3' is not a valid int64"]),
])
def test_qilin_bad_value_is_refused_naming_file_row_field(tmp_path, bad, needles):
    """The Qilin adapter reports a value that does not cast like the parquet adapter does
    (`core.data.schema.cast_column`, shared by both), with the row inside the file it is in."""
    from core.data.corpora import build_corpus
    from core.data.schema import DataError

    root = _qilin_dir(tmp_path, bad)
    with pytest.raises(DataError) as err:
        build_corpus("qilin", input=str(root))
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_qilin_bad_value_through_the_cli_is_one_line(tmp_path):
    root = _qilin_dir(tmp_path, "note_idx")
    proc = prepare_cli("--corpus", "qilin", "--input", str(root), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "part-1.parquet: row 1, field 'note_idx'")
    good = build_corpus_ok(_qilin_dir(tmp_path / "good", "none"))
    assert good == [(7, 1, 2), (7, 2, 3)]


def build_corpus_ok(root: Path) -> list[tuple]:
    """The same folder without a bad value imports (so the tests above fail for the planted value only)."""
    from core.data.corpora import build_corpus

    events = build_corpus("qilin", input=str(root)).events.to_pylist()
    return [(e["user_id"], e["viewed_note_id"], e["clicked_note_id"]) for e in events]
