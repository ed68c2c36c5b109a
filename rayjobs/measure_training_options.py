"""Measure what the training options beyond the paper do: mined hard negatives and Matryoshka widths.

Local (the demo's model and corpus; needs `python -m rayjobs.fetch_assets`; about 15 minutes on 2 cores):

    python -m rayjobs.measure_training_options --out runs/options
    python -m rayjobs.measure_training_options --config rayjobs/configs/smoke.yaml --out runs/options-smoke  # tiny, minutes

On a cluster (OUT on storage the driver sees):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m rayjobs.measure_training_options --out /mnt/shared/options

Four runs of the config with the same seed, initialisation, batch order and step count; only the
option differs:

    base            the config as it is
    hard_negatives  trained on the base run's mined negatives (`rayjobs.mine_negatives`, --num-negatives,
                    --rank-range, --relative-margin) with data.hard_negatives = K
    matryoshka      loss.matryoshka_dims = [small, D/2, D] (D = model.output_dim, small = --small-dim)
    small           model.output_dim = small: a model trained at the small width only

Nothing here chooses among runs, so each finished model is evaluated once on the test split
(catalogue pool, expected ties, 95 % bootstrap intervals), and the claimed differences get paired
intervals on the same queries: hard_negatives - base at full width; at the small width, matryoshka
- base (truncated and re-normalised), matryoshka - small, small - base. One seed per run: a
difference whose interval spans zero is within noise. Writes OUT/options.md and OUT/options.json
with the wall time of every stage and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from core.config import ConfigError, load_run_config
from core.data.negatives import parse_rank_range
from core.data.schema import DataError
from core.evaluation import paired_difference, validation_recall
from core.metrics import parse_metric_key

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"
COMPARISONS = (  # (a, width of a, b, width of b, why); width None = the model's own
    ("hard_negatives", None, "base", None, "mined hard negatives vs in-batch only"),
    ("matryoshka", "small", "base", "small", "Matryoshka vs truncating a full-width model"),
    ("matryoshka", "small", "small", None, "Matryoshka prefix vs a model trained at that width"),
    ("small", None, "base", "small", "trained at the width vs truncated"),
)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def evaluate_once(export: str, dim: int | None) -> tuple[dict, object]:
    """Test recall (and the per-query frame) of a finished model's export, at `dim` or full width."""
    import torch

    from core.checkpoint import load_export

    model, _, cfg = load_export(export)
    model.eval()
    with torch.no_grad():
        return validation_recall(model, cfg.data.path, cfg, "cpu", split="test", return_per_query=True, dims=[],
                                 dim=dim)


def run_options(config: str | Path, out: Path, overrides: list[str], *, num_negatives: int = 4,
                rank_range: tuple[int, int] = (10, 100), relative_margin: float = 0.05, small_dim: int = 16) -> dict:
    """Train, mine, evaluate and compare (module docstring); returns what options.json holds."""
    from rayjobs.mine_negatives import run_mining
    from rayjobs.train import ensure_ray, resolve_paths, run_training

    out = Path(out)
    base_cfg = resolve_paths(load_run_config(config, [*overrides, f"train.storage_path={out / 'runs'}"]))
    width = base_cfg.model.output_dim
    if not 1 <= small_dim < width:
        raise ConfigError(f"--small-dim {small_dim}: must be below model.output_dim={width}")
    dims = sorted({small_dim, max(small_dim + 1, width // 2), width})
    mined = out / "data-hard-negatives"
    variants = {
        "base": [],
        "hard_negatives": [f"data.path={mined}", f"data.hard_negatives={num_negatives}"],
        "matryoshka": [f"loss.matryoshka_dims={json.dumps(dims)}"],
        "small": [f"model.output_dim={small_dim}"],
    }
    seconds, finals = {}, {}
    for name, extra in variants.items():
        if name == "hard_negatives":
            started = time.monotonic()
            ensure_ray()
            run_mining(finals["base"]["export"], base_cfg.data.path, mined, num_negatives=num_negatives,
                       rank_range=rank_range, relative_margin=relative_margin, seed=base_cfg.train.seed,
                       batch_size=base_cfg.eval.batch_size)
            seconds["mining"] = round(time.monotonic() - started, 1)
        cfg = load_run_config(config, [*overrides, *extra, f"train.storage_path={out / 'runs'}", f"train.name={name}"])
        started = time.monotonic()
        print(f"[options] training {name} ({' '.join(extra) or 'the config as it is'})", flush=True)
        finals[name] = run_training(cfg)
        seconds[name] = round(time.monotonic() - started, 1)
    k = parse_metric_key(base_cfg.eval.metric)[1]
    widths = {"small": small_dim, None: None}
    evaluated = {}
    for a, wa, b, wb, _ in COMPARISONS:
        for name, w in ((a, wa), (b, wb)):
            if (name, widths[w]) not in evaluated:
                evaluated[(name, widths[w])] = evaluate_once(finals[name]["export"], widths[w])

    def label(name, w):  # run@width, e.g. matryoshka@16
        return f"{name}@{w or (small_dim if name == 'small' else width)}"

    rows = {label(name, w): metrics for (name, w), (metrics, _) in evaluated.items()}
    diffs = {}
    for a, wa, b, wb, why in COMPARISONS:
        key = f"{label(a, widths[wa])} - {label(b, widths[wb])}"
        diffs[key] = {"why": why, **paired_difference(evaluated[(a, widths[wa])][1], evaluated[(b, widths[wb])][1], [k])}
    result = {"config": str(config), "overrides": overrides, "k": k, "num_negatives": num_negatives,
              "rank_range": list(rank_range), "relative_margin": relative_margin, "dims": dims, "rows": rows,
              "differences": diffs, "seconds": seconds, "loadavg_end": _loadavg(),
              "mining_report": json.loads((mined / "negatives_report.json").read_text())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "options.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "options.md").write_text(options_markdown(result))
    print((out / "options.md").read_text(), flush=True)
    return result


def _cell(value: dict | None) -> str:
    if value is None:
        return "n/a"
    lo, hi = value["ci95"]
    return f"{100 * value['mean']:+.1f} ({100 * lo:+.1f} … {100 * hi:+.1f})"


def options_markdown(result: dict) -> str:
    """The recall table (with intervals) and the paired differences, in points."""
    k = result["k"]
    lines = [f"| run@width | R@{k} all (95 % CI) | R@{k} short query (95 % CI) | queries | pool |", "|---|---|---|---|---|"]
    for name, m in result["rows"].items():
        cells = []
        for subset in ("all", "short_query"):
            value, ci = (m.get(subset) or {}).get(f"R@{k}"), (m.get("ci95", {}).get(subset) or {}).get(f"R@{k}")
            cells.append("n/a" if value is None else f"{100 * value:.1f} ({100 * ci[0]:.1f} … {100 * ci[1]:.1f})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {m.get('num_queries')} | {m.get('pool_size')} |")
    lines += ["", f"| difference (a − b, points) | all R@{k} (95 % CI) | short-query R@{k} (95 % CI) | reading |",
              "|---|---|---|---|"]
    for key, d in result["differences"].items():
        parts = []
        for subset in ("all", "short_query"):
            v = (d.get(subset) or {}).get(f"R@{k}")
            if v is not None:
                lo, hi = v["ci95"]
                parts.append(f"{subset}: " + ("a better" if lo > 0 else "b better" if hi < 0 else "within noise"))
        lines.append(f"| {key} | {_cell((d.get('all') or {}).get(f'R@{k}'))} | "
                     f"{_cell((d.get('short_query') or {}).get(f'R@{k}'))} | {d['why']}; {'; '.join(parts)} |")
    report = result["mining_report"]
    lines += ["", f"Mining: {report['pairs']} pairs, pool {report['pool']}, {report['candidates_seen']} candidates seen, "
                  f"removed {report['removed']}, negatives per pair {report['negatives_per_pair']}.",
              f"Wall time (s): {result['seconds']}; load average at the end: {result['loadavg_end']}. One seed per run."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.measure_training_options", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEMO), help="run config (default: the demo's)")
    p.add_argument("--out", default="runs/options", help="output directory (runs, mined data, options.md/json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (every run)")
    p.add_argument("--num-negatives", type=int, default=4, help="mined negatives per pair (K)")
    p.add_argument("--rank-range", default="10:100", help="LO:HI neighbour ranks negatives come from")
    p.add_argument("--relative-margin", type=float, default=0.05, help="positive-aware margin of the mining")
    p.add_argument("--small-dim", type=int, default=16, help="the small width compared (Matryoshka vs trained at it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_negatives < 1:
            raise ConfigError(f"--num-negatives {args.num_negatives}: must be >= 1")
        run_options(args.config, Path(args.out), args.set, num_negatives=args.num_negatives,
                    rank_range=parse_rank_range(args.rank_range), relative_margin=args.relative_margin,
                    small_dim=args.small_dim)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"rayjobs.measure_training_options: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
