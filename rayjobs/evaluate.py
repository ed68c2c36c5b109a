"""Evaluate a NoteLLM-2 model on held-out pairs: Recall@K (95 % intervals) for all / short-query / short-target.

Embeds every needed note (the test queries and the candidate pool) with Ray Data: `map_batches`
with a callable class on a fixed actor pool, one model load per actor (a GPU each when there is
one), then scores exactly in bounded memory (core.metrics) under the official protocol
(core.evaluation, REFERENCE §7).

Local (starts a local Ray when RAY_ADDRESS is unset; CPU-sized):

    python -m rayjobs.evaluate --checkpoint runs/smoke/export --data runs/data/synthetic \
        --out runs/eval/smoke.json --ks 10,100,1000 --actors 2 --batch-size 16
    python -m rayjobs.evaluate --checkpoint runs/smoke/export --data runs/data/synthetic \
        --out runs/eval/smoke-image.json --modality image          # paper Table 2 ablation
    python -m rayjobs.evaluate --untrained rayjobs/configs/smoke.yaml --data runs/data/synthetic \
        --out runs/eval/untrained.json                               # no-training baseline
    python -m rayjobs.evaluate --untrained rayjobs/configs/smoke.yaml --baseline image-features \
        --data runs/data/synthetic --out runs/eval/vision.json       # raw frozen vision CLS features
    python -m rayjobs.evaluate --checkpoint runs/mrl/export --data runs/data/synthetic \
        --out runs/eval/mrl-8.json --dim 8            # the first 8 coordinates, re-normalised

On a cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m rayjobs.evaluate --checkpoint /mnt/shared/runs/base/export \
        --data /mnt/shared/data/qilin --out /mnt/shared/eval/base.json --actors 8 --batch-size 64

Reads the test split by default (`--split test`): run it on models already chosen on validation
(`--split val` reads what choosing reads). The pool defaults to the whole catalogue minus the
queries (`--pool catalog`); `official` and `targets` (reduced) are REFERENCE §7's others.

Writes PATH.json = {"all": {"R@100": ...}, "short_query": {...}, "short_target": {...},
"ci95": {"all": {"R@100": [lo, hi]}, ...}, "split", "pool", "pool_size", "pool_sizes", "ties",
"tied_fraction", "num_queries", "num": {...}}, plus "dims": {d: the same for the embedding's first d
coordinates, re-normalised} for each Matryoshka width the model was trained with
(`loss.matryoshka_dims`; one embedding pass scores them all), or with `--dim d` that prefix
alone (and "dim": d). Next to it PATH.embeddings.parquet (note_id,
embedding list<float>), PATH.per_query.parquet / .csv (subset, query_id, target_id, rank =
candidates above the target, tied = candidates tied with it) and PATH.md (the Markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from core.config import EVAL_POOLS, MODALITIES, TIE_POLICIES
from core.paths import is_remote, local_only
from core.related_index import INDEX_KINDS

BASELINES = ("image-features",)
INDEXES = INDEX_KINDS  # one home: core.related_index


class NoteEmbedder:
    """Ray Data callable class: preprocessed note batch -> {note_id, embedding}.

    The model is loaded once per actor in the constructor, from an export (`checkpoint`) or built
    untrained from a run-config dict (`untrained`); batches go through the same
    `core.embedding.embed_batch` the in-process validation uses.
    """

    def __init__(self, checkpoint: str | None = None, untrained: dict | None = None, kind: str = "multimodal",
                 modality: str = "both", threads: int | None = None, data_dir: str | None = None):
        import torch

        from core.data.features import feature_cache_for
        from core.embedding import blank_text_prompt

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer, run_cfg = load_model(checkpoint, untrained)
        self.model = model.to(self.device).eval()
        self.kind, self.modality = kind, modality
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.blank = blank_text_prompt(tokenizer, run_cfg.model) if modality == "image" else None
        # data_dir: the notes come without pixels and this actor reads the frozen-feature cache
        # (the first actor builds it under a lock; the others wait and verify it).
        vision = getattr(self.model, "vision", None)
        self.features = feature_cache_for(vision, run_cfg, data_dir) if data_dir is not None else None

    def __call__(self, batch: dict) -> dict:
        from core.embedding import apply_modality, embed_batch

        if self.features is not None:
            batch = self.features.attach(batch)
        batch = apply_modality(batch, self.modality, self.blank, self.pad_id,
                               self.features.blank if self.features is not None else None)
        emb = embed_batch(self.model, batch, self.device, self.kind)  # [B, d] float32
        return {"note_id": np.asarray(batch["note_id"], dtype=np.int64), "embedding": emb.numpy()}


def load_model(checkpoint: str | None, untrained: dict | None):
    """(model, tokenizer, run_cfg) from an export directory or, untrained, from a run-config dict."""
    if checkpoint is not None:
        from core.checkpoint import load_export

        return load_export(checkpoint, device="cpu")
    from core.config import RunConfig
    from core.model.builders import build_model

    run_cfg = RunConfig.from_dict(untrained, "untrained config")
    model, tokenizer = build_model(run_cfg.model, run_cfg.loss, seed=run_cfg.train.seed)
    return model, tokenizer, run_cfg


def run_config_of(checkpoint: str | None, untrained: str | None):
    """The RunConfig of the model under evaluation, without loading weights when avoidable."""
    if untrained is not None:
        from core.config import load_run_config

        return load_run_config(untrained)
    import yaml

    from core.checkpoint import CONFIG_FILE
    from core.config import RunConfig

    config = Path(checkpoint) / CONFIG_FILE  # the export's RunConfig: no weights in the driver
    if not config.exists():
        raise FileNotFoundError(f"{config} not found: {checkpoint} is not a NoteLLM-2 export")
    return RunConfig.from_dict(yaml.safe_load(config.read_text()), str(config))


def init_ray(num_cpus: int | None):
    """Connect to the cluster in RAY_ADDRESS, else start a local Ray; reuse one already running."""
    import ray

    from rayjobs.train import ensure_ray

    ensure_ray(num_cpus)
    return ray


def run_export_command(prog: str, args, problem: str | None, work: Callable) -> int:
    """The `main` of a command that embeds with a model export on Ray (`rayjobs.embed`,
    `rayjobs.mine_negatives`): `problem` (from its check_args) or a bad export or input is one
    line on stderr and exit 2; otherwise Ray starts (`--num-cpus`, or enough logical CPUs for
    `--actors` plus the preprocessing actors) and `work(run_cfg)` runs. `args` has checkpoint,
    actors and num_cpus."""
    from core.config import ConfigError
    from core.data.schema import DataError

    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        run_cfg = run_config_of(args.checkpoint, None)
    except (ConfigError, FileNotFoundError, OSError) as err:
        print(f"{prog}: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    init_ray(args.num_cpus or max(os.cpu_count() or 1, args.actors + run_cfg.data.preprocess_actors + 1))
    try:
        work(run_cfg)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


def embedding_batches(data_dir: str, run_cfg, note_ids, *, checkpoint: str | None = None, untrained: dict | None = None,
                      kind: str = "multimodal", modality: str = "both", actors: int = 1, batch_size: int = 32):
    """Embed `note_ids` with a Ray Data actor pool, yielding (note_ids int64 [b], embeddings float32 [b, d]).

    Ray must be initialised. Each actor loads the model once; `num_gpus=1` per actor on GPU nodes.
    Batches arrive in no particular order.
    """
    import ray
    import torch

    from core.data.features import feature_cache_off_reason
    from core.data.pipeline import note_dataset

    cached = feature_cache_off_reason(run_cfg, data_dir) is None
    ds = note_dataset(data_dir, run_cfg, note_ids=note_ids, decode_images=not cached)
    # Streaming re-blocking: a small file reads as one block, which would keep all but one actor
    # idle; blocks of <= batch_size rows let every actor of the pool take work.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    use_gpu = torch.cuda.is_available()
    ds = ds.map_batches(
        NoteEmbedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "untrained": untrained, "kind": kind, "modality": modality,
                               "threads": None if use_gpu else 1, "data_dir": data_dir if cached else None},
        # Ray 2.60 deprecates map_batches(concurrency=); a fixed pool is ActorPoolStrategy(size=N).
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield np.asarray(batch["note_id"], dtype=np.int64), np.asarray(batch["embedding"], dtype=np.float32)


def embed_with_ray(data_dir: str, run_cfg, note_ids, *, checkpoint: str | None = None, untrained: dict | None = None,
                   kind: str = "multimodal", modality: str = "both", actors: int = 1, batch_size: int = 32,
                   progress: bool = True, wrap_batches: Callable[[Iterable], Iterable] | None = None):
    """Embed `note_ids` with a Ray Data actor pool; returns (note_ids int64 [N], embeddings float32 [N, d]).

    Ray must be initialised (`embedding_batches` does the work). `wrap_batches`, when given, wraps
    the iterator over the embedded `(ids, embeddings)` batches (the benchmark times their arrivals
    with it); it must yield the same batches.
    """
    total = len(note_ids)
    ids, embs, done, last = [], [], 0, 0.0
    batches = embedding_batches(data_dir, run_cfg, note_ids, checkpoint=checkpoint, untrained=untrained, kind=kind,
                                modality=modality, actors=actors, batch_size=batch_size)
    for batch_ids, batch_emb in (wrap_batches or iter)(batches):
        ids.append(batch_ids)
        embs.append(batch_emb)
        done += len(batch_ids)
        if progress and (time.monotonic() - last > 2.0 or done == total):
            print(f"embedded {done}/{total} notes", flush=True)
            last = time.monotonic()
    if not ids:
        raise RuntimeError("the embedding job returned no notes; are the note ids in notes.parquet?")
    return np.concatenate(ids), np.concatenate(embs)


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """PATH.json and the files written next to it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return {
        "json": out,
        "embeddings": Path(f"{stem}.embeddings.parquet"),
        "per_query_parquet": Path(f"{stem}.per_query.parquet"),
        "per_query_csv": Path(f"{stem}.per_query.csv"),
        "markdown": Path(f"{stem}.md"),
    }


def write_embeddings(path: Path, note_ids: np.ndarray, embeddings: np.ndarray) -> None:
    """note_id int64, embedding list<float> (one row per note)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)  # [N, d]
    offsets = np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32) if len(emb) else np.zeros(1, np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(emb.reshape(-1)))
    pq.write_table(pa.table({"note_id": pa.array(note_ids, pa.int64()), "embedding": column}), path)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected comma-separated integers, e.g. 10,100,1000") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected integers >= 1")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of --checkpoint / --untrained)")
    src.add_argument("--checkpoint", help="export directory written by training (core.checkpoint.save_export)")
    src.add_argument("--untrained", metavar="CONFIG.yaml", help="build the model of this run config untrained (baseline)")
    src.add_argument("--baseline", choices=BASELINES,
                     help="image-features: raw frozen vision CLS features of the model's vision encoder")
    p.add_argument("--data", required=True, help="prepared data directory (notes.parquet, pairs_test.parquet)")
    p.add_argument("--out", required=True, help="metrics JSON path; embeddings, per-query ranks and a table go next to it")
    p.add_argument("--modality", choices=MODALITIES, default="both", help="ablation: image (text blanked), text (image removed)")
    p.add_argument("--embedding", choices=("multimodal", "visual"), default="multimodal",
                   help="which note embedding to rank with (visual = the mICL image slot)")
    p.add_argument("--ks", type=_parse_ks, default=None, help="Recall@K cut-offs, e.g. 10,100,1000,10000 (default: eval.ks)")
    p.add_argument("--actors", type=int, default=1, help="embedding actors (one model load each; one GPU each on GPU nodes)")
    p.add_argument("--batch-size", type=int, default=None, help="notes per embedding batch (default: eval.batch_size)")
    p.add_argument("--chunk-size", type=int, default=None, help="candidates scored at a time (default: eval.chunk_size)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="held-out pairs to rank: test (final numbers of chosen models) or val (what choosing reads)")
    p.add_argument("--pool", choices=EVAL_POOLS, default="catalog",
                   help="candidates: every note minus the queries (catalog), the split's notes minus the queries "
                        "(official), or the pairs' targets (targets: a reduced pool)")
    p.add_argument("--ties", choices=TIE_POLICIES, default="expected",
                   help="tied scores: expected recall under random tie-breaking, pessimistic or optimistic")
    p.add_argument("--dim", type=int, default=None,
                   help="rank with the embedding's first DIM coordinates, re-normalised (a Matryoshka width); "
                        "default: the full embedding, plus every trained loss.matryoshka_dims width")
    p.add_argument("--index", choices=INDEXES, default="exact", help="exact ranks, or FAISS hnsw/ivf for huge pools")
    p.add_argument("--name", default=None, help="row name in the Markdown table (default: derived from the model)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    return p


def check_args(args) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    if (args.checkpoint is None) == (args.untrained is None):
        return "give exactly one of --checkpoint PATH or --untrained CONFIG.yaml"
    if args.checkpoint and not is_remote(args.checkpoint) and not Path(args.checkpoint).exists():
        return f"--checkpoint {args.checkpoint}: no such file or directory"
    if args.untrained and not Path(args.untrained).is_file():
        return f"--untrained {args.untrained}: no such config file"
    if not is_remote(args.data):
        for name in ("notes.parquet", f"pairs_{args.split}.parquet"):
            if not (Path(args.data) / name).exists():
                return f"--data {args.data}: {name} not found (prepare it with python -m rayjobs.prepare_data)"
    refused = local_only("--out", args.out)
    if refused:
        return refused
    if not str(args.out).endswith(".json"):
        return f"--out {args.out}: expected a .json path"
    if args.actors < 1 or (args.batch_size is not None and args.batch_size < 1):
        return "--actors and --batch-size must be >= 1"
    if args.dim is not None and args.dim < 1:
        return f"--dim {args.dim}: expected an integer >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"rayjobs.evaluate: error: {problem}", file=sys.stderr)
        return 2

    import torch

    from core.config import ConfigError
    from core.embedding import prefix_embeddings
    from core.evaluation import (
        build_protocol,
        check_modality,
        evaluate_dims,
        evaluate_embeddings,
        markdown_table,
        read_notes,
        read_pairs,
    )

    try:
        run_cfg = run_config_of(args.checkpoint, args.untrained)
    except (ConfigError, FileNotFoundError, OSError) as err:
        print(f"rayjobs.evaluate: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    ks = args.ks or list(run_cfg.eval.ks)
    batch_size = args.batch_size or run_cfg.eval.batch_size
    chunk_size = args.chunk_size or run_cfg.eval.chunk_size
    kind = "image-features" if args.baseline == "image-features" else args.embedding
    width = run_cfg.model.output_dim if kind != "image-features" else None
    if args.dim is not None and width is not None and args.dim > width:
        print(f"rayjobs.evaluate: error: --dim {args.dim}: the embedding has {width} dimensions "
              f"(model.output_dim)", file=sys.stderr)
        return 2

    from core.data.schema import DataError

    try:
        if kind == "multimodal":
            check_modality(run_cfg.model, args.modality)
        pairs = read_pairs(args.data, args.split)
        all_ids = read_notes(args.data, columns=["note_id"])["note_id"].to_numpy() if args.pool == "catalog" else None
        protocol = build_protocol(pairs, pool=args.pool, all_note_ids=all_ids)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"rayjobs.evaluate: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    needed = protocol.needed_ids()
    print(f"{args.split}: {protocol.num_queries} queries, {args.pool} pool of {len(protocol.pool_ids)} notes; "
          f"embedding {len(needed)} notes "
          f"with {args.actors} actor(s), modality={args.modality}, embedding={kind}", flush=True)

    default_cpus = max(os.cpu_count() or 1, args.actors + run_cfg.data.preprocess_actors + 1)
    init_ray(args.num_cpus or default_cpus)
    untrained = run_cfg.to_dict() if args.untrained else None
    ids, emb = embed_with_ray(args.data, run_cfg, needed, checkpoint=args.checkpoint, untrained=untrained, kind=kind,
                              modality=args.modality, actors=args.actors, batch_size=batch_size)
    score = {"chunk_size": chunk_size, "index": args.index, "ties": args.ties}
    if args.dim is not None and args.dim > emb.shape[1]:  # no head: the width is the LLM's, known only now
        print(f"rayjobs.evaluate: error: --dim {args.dim}: the embedding has {emb.shape[1]} dimensions", file=sys.stderr)
        return 2
    metrics, per_query = evaluate_embeddings(ids, prefix_embeddings(torch.from_numpy(emb), args.dim), protocol, ks,
                                             **score)
    trained = list(run_cfg.loss.matryoshka_dims) if kind != "image-features" else []
    if args.dim is not None:
        metrics["dim"] = args.dim
    elif trained:
        metrics["dims"] = evaluate_dims(ids, emb, protocol, ks, trained, **score)
    metrics["split"] = args.split
    metrics["modality"] = args.modality
    metrics["embedding"] = kind
    metrics["index"] = args.index

    paths = output_paths(args.out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(metrics, indent=2))
    write_embeddings(paths["embeddings"], ids, emb)
    per_query.to_parquet(paths["per_query_parquet"], index=False)
    per_query.to_csv(paths["per_query_csv"], index=False)
    name = args.name or _row_name(args, kind) + (f" {args.dim}-d" if args.dim else "")
    rows = [(name, metrics)] + [(f"{name} {d}-d", m) for d, m in (metrics.get("dims") or {}).items()]
    paths["markdown"].write_text(markdown_table(rows, ks))
    print(markdown_table(rows, ks), end="")
    if "approx_check" in metrics:
        check = metrics["approx_check"]
        loss = ", ".join(f"{k} {v:+.4f}" for k, v in check["recall_loss"].items() if v is not None)
        print(f"{args.index} index vs exact on {check['queries']} sampled queries: recall loss {loss}", flush=True)
    print(f"wrote {paths['json']} (+ {paths['embeddings'].name}, {paths['per_query_parquet'].name}, "
          f"{paths['per_query_csv'].name}, {paths['markdown'].name})", flush=True)
    return 0


def _row_name(args, kind: str) -> str:
    model = Path(args.checkpoint or args.untrained).name
    if args.checkpoint and model == "export":
        model = Path(args.checkpoint).parent.name  # runs/<name>/export -> <name>
    if args.untrained:
        model = f"{Path(args.untrained).stem} (untrained)"
    if kind == "image-features":
        model += " vision CLS"
    return f"{model} [{args.modality}]"


if __name__ == "__main__":
    sys.exit(main())
