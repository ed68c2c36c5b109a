"""Embed a whole catalogue with a trained model and index it for related-note lookups.

Every note of a prepared data directory goes through the evaluation's Ray Data actor pool
(`rayjobs.evaluate.embedding_batches`: one model load per actor, a GPU each when there is one);
the embeddings are truncated to `--dim`, L2-normalised and written with a FAISS index and a
manifest (layout: core.related_index). The work is cut into shards of `--shard-size` notes (by
sorted note id), each written atomically as soon as all its notes are back: a killed job, rerun
with the same command, embeds only the shards that are missing.

Local (starts a local Ray when RAY_ADDRESS is unset; CPU-sized):

    python -m rayjobs.embed --checkpoint runs/smoke/export --data runs/data/synthetic-smoke \
        --out runs/index/smoke --index exact --actors 2 --batch-size 16

On a cluster (OUT on storage the driver sees; the actors only read DATA):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m rayjobs.embed --checkpoint /mnt/shared/runs/base/export --data /mnt/shared/data/qilin \
        --out /mnt/shared/index/base --index hnsw --actors 8 --batch-size 64

Writes OUT/embeddings.parquet, OUT/index.faiss, OUT/manifest.json (written last: its presence
means the directory is complete) and OUT/shards/ (plan.json + part-NNNNN.parquet, kept so a
rerun after a crash skips finished shards). Serve it with `python -m rayjobs.serve --index OUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.related_index import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    INDEX_KINDS,
    MANIFEST_FILE,
    SHARDS_DIR,
    embeddings_table,
    export_hash,
    finalize_embeddings,
    read_embeddings,
    write_index_dir,
)
from rayjobs.evaluate import embedding_batches, run_config_of, run_export_command

PLAN_FILE = "plan.json"
DEFAULT_SHARD_SIZE = 4096


def shard_path(out: Path, shard: int) -> Path:
    return out / SHARDS_DIR / f"part-{shard:05d}.parquet"


def _check_plan(out: Path, plan: dict) -> None:
    """Write OUT/shards/plan.json, or check that the shards already there were made the same way."""
    path = out / SHARDS_DIR / PLAN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise ValueError(f"{path}: the shards there were made with other {', '.join(diff)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use another --out or delete {out}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")


def run_embed(checkpoint: str, data_dir: str, out: str | os.PathLike, *, dim: int | None = None,
              index_kind: str = "exact", actors: int = 1, batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
              on_shard: Callable[[int, int], None] | None = None) -> dict:
    """Embed every note of `data_dir` into `out` (layout: module docstring); Ray must be initialised.

    Args:
        checkpoint: model export directory.
        data_dir: prepared data directory (notes.parquet).
        out: index directory (created).
        dim: keep the first `dim` embedding dimensions (default: the model's output_dim).
        index_kind: one of INDEX_KINDS.
        actors, batch_size: the embedding actor pool and its batch size.
        shard_size: notes per resumable shard.
        on_shard: called as on_shard(shard, shards_written_this_run) after each shard is on disk.

    Returns:
        {"shards": total, "skipped_shards": already on disk, "embedded_notes": this run, "count": notes}.
    """
    from core.evaluation import read_notes

    out = Path(out)
    run_cfg = run_config_of(checkpoint, None)
    dim = int(dim or run_cfg.model.output_dim)
    if not 1 <= dim <= run_cfg.model.output_dim:
        raise ValueError(f"--dim {dim}: the model's embeddings have {run_cfg.model.output_dim} dimensions")
    ids = np.unique(read_notes(data_dir, columns=["note_id"])["note_id"].to_numpy().astype(np.int64))
    if len(ids) == 0:
        raise ValueError(f"{data_dir}: notes.parquet has no notes")
    ehash = export_hash(checkpoint)
    num_shards = -(-len(ids) // shard_size)
    _check_plan(out, {"export_hash": ehash, "dim": dim, "shard_size": shard_size, "count": int(len(ids)),
                      "data": str(data_dir)})
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # written again, last, when the directory is complete
    for stale in (out / SHARDS_DIR).glob("part-*.tmp-*"):  # half-written shards of a killed run
        stale.unlink()
    done = {s for s in range(num_shards) if shard_path(out, s).exists()}
    todo = [s for s in range(num_shards) if s not in done]
    print(f"{len(ids)} notes in {num_shards} shard(s) of {shard_size}: {len(done)} already on disk, "
          f"embedding {len(todo)}", flush=True)

    embedded = _embed_shards(checkpoint, data_dir, run_cfg, out, ids, todo, dim=dim, actors=actors,
                             batch_size=batch_size, shard_size=shard_size, on_shard=on_shard)
    return _finish(out, checkpoint, data_dir, ehash, dim, index_kind, num_shards,
                   stats={"shards": num_shards, "skipped_shards": len(done), "embedded_notes": embedded,
                          "count": int(len(ids))})


def _embed_shards(checkpoint, data_dir, run_cfg, out: Path, ids: np.ndarray, todo: list[int], *, dim: int,
                  actors: int, batch_size: int, shard_size: int, on_shard) -> int:
    """Embed the notes of the `todo` shards, writing each shard once all its notes are back."""
    from core.data.schema import write_table

    if not todo:
        return 0
    wanted = np.concatenate([ids[s * shard_size:(s + 1) * shard_size] for s in todo])
    pending: dict[int, tuple[list, list]] = {s: ([], []) for s in todo}
    got = dict.fromkeys(todo, 0)
    written, embedded, last = 0, 0, 0.0
    for batch_ids, batch_emb in embedding_batches(data_dir, run_cfg, wanted, checkpoint=checkpoint, actors=actors,
                                        batch_size=batch_size):
        emb = finalize_embeddings(batch_emb, dim)  # [b, dim]
        shard_of = np.searchsorted(ids, batch_ids) // shard_size  # [b]
        for s in np.unique(shard_of):
            rows = shard_of == s
            pending[s][0].append(batch_ids[rows])
            pending[s][1].append(emb[rows])
            got[s] += int(rows.sum())
            size = min(shard_size, len(ids) - s * shard_size)
            if got[s] == size:
                part_ids, part_emb = np.concatenate(pending[s][0]), np.concatenate(pending[s][1])
                order = np.argsort(part_ids)
                write_table(embeddings_table(part_ids[order], part_emb[order]), shard_path(out, s))
                del pending[s]
                written += 1
                if on_shard is not None:
                    on_shard(int(s), written)
        embedded += len(batch_ids)
        if time.monotonic() - last > 2.0 or embedded == len(wanted):
            print(f"embedded {embedded}/{len(wanted)} notes, {written}/{len(todo)} shard(s) written", flush=True)
            last = time.monotonic()
    if pending:
        raise RuntimeError(f"shards {sorted(pending)[:5]} did not get all their notes back from the embedding job")
    return embedded


def _finish(out: Path, checkpoint, data_dir, ehash: str, dim: int, index_kind: str, num_shards: int,
            stats: dict) -> dict:
    """Concatenate the shards, build the index, write the manifest (last)."""
    parts = [read_embeddings(shard_path(out, s)) for s in range(num_shards)]
    ids = np.concatenate([p[0] for p in parts])
    emb = np.concatenate([p[1] for p in parts])  # [N, dim], rows sorted by note id
    write_index_dir(out, ids, emb, export=str(Path(checkpoint).resolve()), export_hash=ehash, index_kind=index_kind,
                    data=str(data_dir))
    print(f"wrote {out / EMBEDDINGS_FILE} ({len(ids)} x {dim}), {out / INDEX_FILE} ({index_kind}), "
          f"{out / MANIFEST_FILE}", flush=True)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.embed", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model export directory written by training (RUN/export)")
    p.add_argument("--data", required=True, help="prepared data directory (notes.parquet)")
    p.add_argument("--out", required=True, help="index directory to write (rerun the same command to resume)")
    p.add_argument("--dim", type=int, default=None, help="keep the first D dimensions, then L2-normalise "
                                                         "(default: the model's output_dim)")
    p.add_argument("--index", choices=INDEX_KINDS, default="exact",
                   help="FAISS index: exact (flat inner product), hnsw (graph) or ivf (cells) for huge catalogues")
    p.add_argument("--actors", type=int, default=1, help="embedding actors (one model load each; one GPU each on GPU nodes)")
    p.add_argument("--batch-size", type=int, default=None, help="notes per embedding batch (default: eval.batch_size)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="notes per resumable shard")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    return p


def check_args(args) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    from core.checkpoint import CONFIG_FILE

    if "://" not in args.checkpoint and not (Path(args.checkpoint) / CONFIG_FILE).exists():
        return (f"--checkpoint {args.checkpoint}: not a model export (no {CONFIG_FILE}); "
                "train one with python -m rayjobs.train")
    if "://" not in args.data and not (Path(args.data) / "notes.parquet").exists():
        return f"--data {args.data}: notes.parquet not found (prepare it with python -m rayjobs.prepare_data)"
    if "://" in str(args.out):
        return f"--out {args.out}: a local or shared-filesystem directory is needed"
    if args.actors < 1 or (args.batch_size is not None and args.batch_size < 1) or args.shard_size < 1:
        return "--actors, --batch-size and --shard-size must be >= 1"
    if args.dim is not None and args.dim < 1:
        return f"--dim {args.dim}: must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_export_command("rayjobs.embed", args, check_args(args), lambda run_cfg: run_embed(
        args.checkpoint, args.data, args.out, dim=args.dim, index_kind=args.index, actors=args.actors,
        batch_size=args.batch_size or run_cfg.eval.batch_size, shard_size=args.shard_size))


if __name__ == "__main__":
    sys.exit(main())
