"""GradCache benchmark: peak memory and step time vs contrastive batch size, chunked vs not.

Each (batch size, chunk size) point runs in its own subprocess (a process's peak RSS only grows),
building the model of a run config and timing full training steps (`core.step.start_pair_step`
+ backward + AdamW) on synthetic pairs, in a plain loop (no Ray, no DeepSpeed: the figure is the
step itself). Peak memory is CUDA's max_memory_allocated on a GPU, else the growth of the
process's peak RSS over its size before the first step.

    python -m rayjobs.bench_grad_cache --config rayjobs/configs/smoke.yaml --batch-sizes 8,32 --chunk 4
    python -m rayjobs.bench_grad_cache --config rayjobs/configs/demo.yaml --batch-sizes 16,64 --chunk 8 \\
        --out runs/bench/grad_cache.json                  # the real models (after fetch_assets)
On a cluster node:
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m rayjobs.bench_grad_cache --config rayjobs/configs/paper.yaml --batch-sizes 64,256 --chunk 16

Prints one Markdown row per point: batch, chunk (0 = off), peak MB, step s (median of --steps),
the loss of the first step (chunked and unchunked must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_point(config: str, data_dir: str, batch_size: int, chunk: int, steps: int, seed: int = 0) -> dict:
    """One point in this process: first-step loss, median step seconds, peak MB."""
    import torch

    from core.config import load_run_config
    from core.data.pipeline import iter_pair_batches_local
    from core.model.builders import build_model
    from core.step import start_pair_step

    cfg = load_run_config(config, [f"data.path={data_dir}", f"loss.grad_cache_chunk_size={chunk}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model, _ = build_model(cfg.model, cfg.loss, seed=seed)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    batches = iter_pair_batches_local(data_dir, "train", cfg, batch_size, seed=seed)
    times, first_loss = [], None
    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    for _ in range(steps):
        batch = next(batches)
        t0 = time.perf_counter()
        loss, _, backward = start_pair_step(model, batch, cfg.loss, device)
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        first_loss = float(loss) if first_loss is None else first_loss
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"batch": batch_size, "chunk": chunk, "peak_mb": round(peak - base, 1), "step_s": statistics.median(times),
            "first_loss": first_loss, "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayjobs.bench_grad_cache", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="rayjobs/configs/smoke.yaml", help="run config whose model and loss are measured")
    p.add_argument("--batch-sizes", default="8,32", help="pairs per step, comma-separated")
    p.add_argument("--chunk", type=int, default=4, help="GradCache chunk (pairs) of the chunked points")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median reported)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--point", nargs=3, metavar=("DATA", "BATCH", "CHUNK"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    if args.point:
        data, batch, chunk = args.point
        print(json.dumps(measure_point(args.config, data, int(batch), int(chunk), args.steps)))
        return 0
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        print(f"error: --batch-sizes {args.batch_sizes!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    if not Path(args.config).is_file() or args.chunk < 1 or min(sizes) < 1:
        print("error: --config must be a run config file, --chunk and --batch-sizes >= 1", file=sys.stderr)
        return 2
    from core.data.prepare import prepare

    data = Path(tempfile.mkdtemp(prefix="bench-gc-")) / "synthetic"
    # enough training pairs for steps x the largest batch (the split keeps ~70 % for training)
    prepare("synthetic", str(data), num_notes=max(80, 4 * max(sizes) * (args.steps + 1)), seed=0)
    rows = []
    print("| pairs/step | chunk | peak MB | step s | first-step loss |\n|---|---|---|---|---|", flush=True)
    for batch in sizes:
        for chunk in (0, args.chunk):
            cmd = [sys.executable, "-m", "rayjobs.bench_grad_cache", "--config", args.config, "--steps",
                   str(args.steps), "--point", str(data), str(batch), str(chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            rows.append(row)
            print(f"| {batch} | {chunk or 'off'} | {row['peak_mb']:.0f} | {row['step_s']:.2f} | {row['first_loss']:.6f} |",
                  flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f} (step times are only comparable on an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
