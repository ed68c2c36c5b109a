"""Measure a training step on cached frozen features against the live vision encoder.

Local (the demo's model: SmolLM2-135M cut to 4 layers + ImageNet MobileNetV2 at 224 px, 16 pairs
a step; needs `python -m rayjobs.fetch_assets`):

    python -m rayjobs.measure_feature_cache --steps 6 --threads 2
    python -m rayjobs.measure_feature_cache --config rayjobs/configs/smoke.yaml --steps 4   # tiny, seconds

On a cluster node (same code; the data directory must be local or NFS):

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m rayjobs.measure_feature_cache --steps 10

One process, one model, plain torch AdamW (the update DeepSpeed runs on CPU): a step is forward +
backward + optimizer step of `core.step.forward_pair_batch`, with the pixels already decoded, so
the difference is the encoder alone. Live and cached steps alternate (live, cached, cached, live,
...) so drifting machine load hits both alike; the first pair is warm-up and not counted. Prints
min/median/max of each, the ratio of medians (`cached_over_live_step`) and of each pair, the time to build the
cache for the whole corpus (plain batched pass) and `/proc/loadavg` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DATA = "runs/measure_feature_cache/data"


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def measure(config: str, steps: int, threads: int, data: str, notes: int) -> dict:
    import shutil

    import torch

    from core.config import load_run_config
    from core.data.features import CACHE_DIR, ensure_feature_cache
    from core.data.pipeline import iter_pair_batches_local
    from core.model.builders import build_model
    from core.step import forward_pair_batch

    torch.set_num_threads(threads)
    cfg = load_run_config(config, ["data.feature_cache=auto", f"data.path={data}"])
    if not Path(cfg.data.path, "pairs_train.parquet").exists():
        from core.data.prepare import prepare

        prepare(cfg.data.corpus, cfg.data.path, num_notes=notes if cfg.data.num_notes is None else cfg.data.num_notes,
                seed=cfg.data.seed)
    load_before = _loadavg()
    model, _ = build_model(cfg.model, cfg.loss, seed=cfg.train.seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    shutil.rmtree(Path(cfg.data.path) / CACHE_DIR, ignore_errors=True)  # this script's own data dir: a cold build
    t0 = time.perf_counter()
    cache = ensure_feature_cache(model.vision, cfg.data.path)
    build_s = time.perf_counter() - t0
    B = cfg.train.batch_size
    live = iter_pair_batches_local(cfg.data.path, "train", cfg, batch_size=B, seed=0)
    cached = iter_pair_batches_local(cfg.data.path, "train", cfg, batch_size=B, seed=0, decode_images=False)
    times: dict[str, list[float]] = {"live": [], "cached": []}
    for i in range(steps + 1):
        order = ("live", "cached") if i % 2 == 0 else ("cached", "live")
        for kind in order:
            batch = next(live if kind == "live" else cached)
            t = time.perf_counter()
            loss, _ = forward_pair_batch(model, batch, cfg.loss, "cpu", cache if kind == "cached" else None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # the first pair warms up allocators and the folded encoder
                times[kind].append(time.perf_counter() - t)
    live_s, cached_s = _spread(times["live"]), _spread(times["cached"])
    return {"config": str(config), "model": {"llm": cfg.model.llm, "vision": cfg.model.vision,
                                             "image_size": cfg.model.image_size},
            "pairs_per_step": B, "threads": threads, "live_step_s": live_s, "cached_step_s": cached_s,
            "cached_over_live_step": cached_s["median"] / live_s["median"],
            # each interleaved pair ran under nearly the same load: its ratio is steadier on a busy machine
            "paired_ratio": _spread([c / v for c, v in zip(times["cached"], times["live"])]),
            "cache_build_s": build_s, "cache_notes": int(cache.manifest["num_notes"]),
            "loadavg_before": load_before, "loadavg_after": _loadavg(), "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayjobs.measure_feature_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO), help="run config YAML (default: the demo's)")
    parser.add_argument("--data", default=DATA, help="its own prepared data directory (the config's corpus is prepared "
                        "there when missing; its feature cache is deleted and rebuilt to time a cold build)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind (after one warm-up pair)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo's worker has 2 CPUs)")
    parser.add_argument("--notes", type=int, default=240, help="corpus size when the data must be prepared")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.config, args.steps, args.threads, args.data, args.notes)
    for kind in ("live", "cached"):
        s = result[f"{kind}_step_s"]
        print(f"{kind:>6} step: min {s['min']:.3f} s  median {s['median']:.3f} s  max {s['max']:.3f} s  (n={s['n']})")
    r = result["paired_ratio"]
    print(f"cached/live of each interleaved pair: min {r['min']:.3f} median {r['median']:.3f} max {r['max']:.3f}")
    print(f"cached_over_live_step {result['cached_over_live_step']:.3f}; cache build {result['cache_build_s']:.1f} s "
          f"for {result['cache_notes']} notes; loadavg before [{result['loadavg_before']}] after "
          f"[{result['loadavg_after']}] on {result['cores']} cores")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
