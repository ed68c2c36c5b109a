"""Mine hard negatives for the training pairs with a trained model, into a new prepared data directory.

Embeds the training notes (every note of pairs_train.parquet) with the evaluation's Ray Data
actor pool, retrieves each training query's nearest notes and keeps, per pair, up to
`--num-negatives` notes that are not the query, not paired with it, not in a click-log event
with it, ranked inside `--rank-range`, and scoring below (1 - `--relative-margin`) x the pair's
positive (rules: core.data.negatives). OUT is DATA with pairs_train.parquet rewritten to carry
a `negative_ids` list<int64> column, plus negatives_report.json (candidates seen, removed by
each rule, negatives per pair); the other files are hard-linked (copied across filesystems).

Local (starts a local Ray when RAY_ADDRESS is unset; CPU-sized):

    python -m rayjobs.mine_negatives --checkpoint runs/smoke/export --data runs/data/synthetic-smoke \
        --out runs/data/synthetic-smoke-hn --num-negatives 4 --rank-range 3:30
    python -m rayjobs.train --config rayjobs/configs/smoke.yaml \
        --set data.path=runs/data/synthetic-smoke-hn --set data.hard_negatives=4

On a cluster (DATA and OUT on storage the driver sees):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m rayjobs.mine_negatives --checkpoint /mnt/shared/runs/base/export \
        --data /mnt/shared/data/qilin --out /mnt/shared/data/qilin-hn --actors 8 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from core.data.negatives import NEGATIVES_REPORT_FILE, mine_hard_negatives, parse_rank_range
from core.data.schema import EVENTS_FILE, PAIRS_FILES, DataError, read_table, write_table
from core.paths import local_only
from core.related_index import finalize_embeddings
from rayjobs.evaluate import embed_with_ray, run_config_of, run_export_command

TRAIN_PAIRS = PAIRS_FILES["train"]


def link_data_dir(data: Path, out: Path, skip: set[str]) -> None:
    """OUT mirrors DATA (hard links, or copies across filesystems), without the names in `skip`."""
    for src in data.rglob("*"):
        rel = src.relative_to(data)
        if rel.parts[0] in skip or src.is_dir():
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def run_mining(checkpoint: str, data: str | os.PathLike, out: str | os.PathLike, *, num_negatives: int = 8,
               rank_range: tuple[int, int] = (10, 100), relative_margin: float = 0.05, seed: int = 0,
               actors: int = 1, batch_size: int = 32) -> dict:
    """Mine negatives from DATA's training pairs into OUT (layout: module docstring); Ray must be up.

    Returns:
        The report (also OUT/negatives_report.json).
    """
    data, out = Path(data), Path(out)
    pairs = read_table(data / TRAIN_PAIRS)
    events = read_table(data / EVENTS_FILE) if (data / EVENTS_FILE).exists() else None
    if pairs.num_rows == 0:
        raise DataError(f"{data / TRAIN_PAIRS}: no training pairs to mine negatives for")
    run_cfg = run_config_of(checkpoint, None)
    pool = np.unique(np.concatenate([pairs["query_id"].to_numpy(), pairs["target_id"].to_numpy()]).astype(np.int64))
    print(f"[mine_negatives] embedding {len(pool)} training notes of {data}", flush=True)
    ids, emb = embed_with_ray(str(data), run_cfg, pool, checkpoint=checkpoint, actors=actors, batch_size=batch_size)
    order = np.argsort(ids)
    mined, report = mine_hard_negatives(pairs, events, ids[order], finalize_embeddings(emb[order]),
                                        num_negatives=num_negatives, rank_range=rank_range,
                                        relative_margin=relative_margin, seed=seed)
    report.settings.update(checkpoint=str(Path(checkpoint).resolve()), data=str(data.resolve()))
    link_data_dir(data, out, skip={TRAIN_PAIRS, NEGATIVES_REPORT_FILE})
    write_table(mined, out / TRAIN_PAIRS)
    result = report.to_dict()
    (out / NEGATIVES_REPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    n = result["negatives_per_pair"]
    print(f"[mine_negatives] {result['pairs']} pairs of {result['queries']} queries, pool {result['pool']} "
          f"({result['search']}): {result['candidates_seen']} candidates seen, removed {result['removed']}; "
          f"negatives per pair min {n['min']} median {n['median']} max {n['max']} "
          f"({result['pairs_short_of_k']} pairs with fewer than {num_negatives}); wrote {out / TRAIN_PAIRS}, "
          f"{out / NEGATIVES_REPORT_FILE}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.mine_negatives", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model export directory written by training (RUN/export)")
    p.add_argument("--data", required=True, help="prepared data directory (pairs_train.parquet, notes.parquet)")
    p.add_argument("--out", required=True, help="new prepared data directory: DATA plus negative_ids")
    p.add_argument("--num-negatives", type=int, default=8, help="negatives kept per training pair (K)")
    p.add_argument("--rank-range", default="10:100", help="LO:HI, the neighbour ranks negatives come from "
                                                           "(0 = the nearest other note)")
    p.add_argument("--relative-margin", type=float, default=0.05,
                   help="drop candidates scoring >= (1 - margin) x the pair's positive score (pos - margin*|pos| below zero)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample among eligible candidates")
    p.add_argument("--actors", type=int, default=1, help="embedding actors (one model load each)")
    p.add_argument("--batch-size", type=int, default=None, help="notes per embedding batch (default: eval.batch_size)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (ignored with RAY_ADDRESS)")
    return p


def check_args(args) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    from core.checkpoint import CONFIG_FILE

    for option, value, copy in (("--checkpoint", args.checkpoint, "from"), ("--data", args.data, "from"),
                                ("--out", args.out, "to")):
        problem = local_only(option, value, copy=copy)
        if problem:
            return problem
    if not (Path(args.checkpoint) / CONFIG_FILE).exists():
        return f"--checkpoint {args.checkpoint}: not a model export (no {CONFIG_FILE}); train one with python -m rayjobs.train"
    if not (Path(args.data) / TRAIN_PAIRS).exists():
        return f"--data {args.data}: {TRAIN_PAIRS} not found (prepare it with python -m rayjobs.prepare_data)"
    if Path(args.out).resolve() == Path(args.data).resolve():
        return f"--out {args.out}: must differ from --data (OUT is a new data directory)"
    if args.num_negatives < 1 or args.actors < 1 or (args.batch_size is not None and args.batch_size < 1):
        return "--num-negatives, --actors and --batch-size must be >= 1"
    if not 0.0 <= args.relative_margin < 1.0:
        return f"--relative-margin {args.relative_margin}: must be in [0, 1)"
    try:
        parse_rank_range(args.rank_range)
    except ValueError as err:
        return f"--rank-range: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_export_command("rayjobs.mine_negatives", args, check_args(args), lambda run_cfg: run_mining(
        args.checkpoint, args.data, args.out, num_negatives=args.num_negatives,
        rank_range=parse_rank_range(args.rank_range), relative_margin=args.relative_margin, seed=args.seed,
        actors=args.actors, batch_size=args.batch_size or run_cfg.eval.batch_size))


if __name__ == "__main__":
    sys.exit(main())
