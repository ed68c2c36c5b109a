"""rayjobs.embed: the catalogue index (files, manifest, FAISS), equal to the evaluation's embeddings; a killed
job resumes without recomputing finished shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.related_index import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    export_hash,
    finalize_embeddings,
    load_index_dir,
)
from rayjobs import embed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.core.test_evaluation import tiny_eval_setup

    return tiny_eval_setup(tmp_path_factory.mktemp("embed"), num_notes=60)


@pytest.fixture(scope="module")
def killed_and_resumed(ray_local, tiny_run, tmp_path_factory):
    """A job SIGKILLed after its second shard (its own driver process, on the test's Ray), then rerun."""
    out = tmp_path_factory.mktemp("index") / "resumed"
    script = textwrap.dedent(f"""
        import os
        from rayjobs.embed import run_embed
        from rayjobs.evaluate import init_ray

        init_ray(None)
        def die_after_two(shard, written):
            if written == 2:
                os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, like a lost node or an OOM kill
        run_embed({tiny_run.export_dir!r}, {tiny_run.data_dir!r}, {str(out)!r}, actors=1, batch_size=5,
                  shard_size=10, on_shard=die_after_two)
    """)
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    parts = sorted((out / "shards").glob("part-*.parquet"))
    killed = {"parts": len(parts), "manifest": (out / MANIFEST_FILE).exists(),
              "stat": {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts}}
    stats = embed.run_embed(tiny_run.export_dir, tiny_run.data_dir, out, actors=2, batch_size=5, shard_size=10)
    return out, killed, stats


def test_help_and_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        embed.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--data", "--out", "--dim", "--index", "--shard-size"):
        assert flag in out
    assert "ray job submit" in embed.__doc__ and "python -m rayjobs.embed" in embed.__doc__


@pytest.mark.parametrize("argv,needle", [
    (["--checkpoint", "/no/such/export", "--data", "{data}", "--out", "{out}"], "not a model export"),
    (["--checkpoint", "{export}", "--data", "/no/such/data", "--out", "{out}"], "notes.parquet not found"),
    (["--checkpoint", "{export}", "--data", "{data}", "--out", "{out}", "--dim", "0"], "--dim 0"),
    (["--checkpoint", "{export}", "--data", "{data}", "--out", "s3://bucket/x"], "--out s3://bucket/x"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_run, tmp_path, capsys, argv, needle):
    fill = {"data": tiny_run.data_dir, "export": tiny_run.export_dir, "out": str(tmp_path / "o")}
    assert embed.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


@pytest.mark.slow  # shares the kill + resume fixture: two embedding jobs, one in a subprocess
def test_killed_job_reruns_only_the_missing_shards(killed_and_resumed):
    out, killed, stats = killed_and_resumed
    assert killed["parts"] == 2 and not killed["manifest"]  # two shards on disk, the directory incomplete
    assert stats == {"shards": 6, "skipped_shards": 2, "embedded_notes": 40, "count": 60}
    after = {name: ((out / "shards" / name).stat().st_ino, (out / "shards" / name).stat().st_mtime_ns)
             for name in killed["stat"]}
    assert after == killed["stat"]  # the finished shards were not rewritten


@pytest.mark.slow  # shares the kill + resume fixture: two embedding jobs, one in a subprocess
def test_index_files_manifest_and_equality_with_the_evaluation_path(killed_and_resumed, tiny_run):
    from core.checkpoint import load_export
    from core.data.pipeline import NotePreprocessor
    from core.embedding import embed_notes_local
    from core.evaluation import preprocess_notes_local, read_notes

    out, _, _ = killed_and_resumed
    table = pq.read_table(out / EMBEDDINGS_FILE)
    assert table.schema.field("note_id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)  # fixed-size list
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["export_hash"] == export_hash(tiny_run.export_dir)
    assert (manifest["dim"], manifest["normalisation"], manifest["index"], manifest["count"]) == (16, "l2", "exact", 60)
    assert manifest["created"].endswith("+00:00")

    catalog = load_index_dir(out)
    assert catalog.index.ntotal == 60 and (np.diff(catalog.ids) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(catalog.embeddings, axis=1), 1.0, rtol=1e-5)
    # The evaluation's embedding code (in-process; test_evaluate checks it equals its Ray path),
    # finalised the same way, gives the same vectors: the resumed shards mix in nothing stale.
    model, _, cfg = load_export(tiny_run.export_dir)
    notes = preprocess_notes_local(read_notes(tiny_run.data_dir), NotePreprocessor(cfg.model))
    ids, raw = embed_notes_local(model, notes, "cpu", batch_size=13)
    order = np.argsort(ids.numpy())
    np.testing.assert_array_equal(ids.numpy()[order], catalog.ids)
    np.testing.assert_allclose(finalize_embeddings(raw.numpy()[order]), catalog.embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # shares the kill + resume fixture: two embedding jobs, one in a subprocess
def test_other_parameters_do_not_mix_with_the_shards_on_disk(killed_and_resumed, tiny_run):
    out, _, _ = killed_and_resumed
    with pytest.raises(ValueError, match="other dim"):  # checked before any embedding work
        embed.run_embed(tiny_run.export_dir, tiny_run.data_dir, out, dim=8, shard_size=10)
    with pytest.raises(ValueError, match="other shard_size"):
        embed.run_embed(tiny_run.export_dir, tiny_run.data_dir, out, shard_size=20)
