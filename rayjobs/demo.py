"""The main job: reproduce the NoteLLM-2 story on real data, end to end, on an embedded Ray.

    python -m rayjobs.demo             # 23.6 min measured on 2 idle CPU cores (2026-11-30)
    python -m rayjobs.demo --quick     # 1 sweep trial + basic MLRM (NoteLLM-2 is the trial), 8 steps: 4.5 min
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- python -m rayjobs.demo --out /mnt/shared/demo

Stages (each prints progress and an ETA):
  1. data      prepare the Tux Paint corpus (real photos/drawings + captions; simulated clicks)
  2. sweep     a small Ray Tune + Optuna sweep over L, alpha and tau (search_spaces/demo.yaml)
  3. baseline  no-training rows: the untrained NoteLLM-2 (image / text / both) and the raw frozen
               vision feature; not with --quick
  4. ablation  the paper's ablation at the sweep's best trial (its config, written to
               ablation_base.yaml, with one switch changed per run): basic MLRM, + mICL,
               + late fusion, NoteLLM-2 (both), only late fusion, text-only. The variant equal
               to the best trial (NoteLLM-2: the demo sweep keeps mICL + late fusion) is that
               trial's run, not trained again.
  5. evaluate  each ablation run on the *test* split (read here only), with the modality
               ablation (both / image only / text only) on its export
  6. report    ablation.md / ablation.json (recall with 95 % intervals, paired differences
               against basic MLRM, the untrained model and the raw vision feature) and the
               leaderboard (csv, md, html) over everything

Everything that chooses (the sweep's trials, its best trial = the ablation's tuned point) reads
the validation split; the test split is read once, by stage 5 and the baselines.

Rerunning resumes: finished runs are kept (their final_metrics.json), an interrupted sweep is
resumed, an interrupted run continues from its last checkpoint. --quick writes to
runs/demo-quick; a sweep directory is only resumed with the settings it was run with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from core.config import ConfigError, RunConfig, dump_run_config, load_run_config
from core.data.pipeline import needs_image
from core.evaluation import paired_difference, validation_recall
from core.metrics import SUBSETS, format_recall_ci, parse_metric_key
from core.paths import is_remote
from rayjobs.leaderboard import TEST_METRICS_FILE
from rayjobs.tune import run_sweep, short_value
from search_spaces.schema import SweepError

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPACE = ROOT / "search_spaces" / "demo.yaml"
MODALITIES = ("both", "image", "text")

# (name, label in the paper's table, overrides of demo.yaml)
VARIANTS = (
    ("basic", "basic MLRM", ["model.prompt_mode=basic", "model.late_fusion=false"]),
    ("micl", "+ mICL", ["model.prompt_mode=micl", "model.late_fusion=false"]),
    ("late_fusion", "+ late fusion", ["model.prompt_mode=basic", "model.late_fusion=true"]),
    ("notellm2", "NoteLLM-2 (both)", ["model.prompt_mode=micl", "model.late_fusion=true"]),
    ("only_late_fusion", "only late fusion", ["model.prompt_mode=text", "model.late_fusion=true"]),
    ("text_only", "text-only", ["model.prompt_mode=text", "model.late_fusion=false"]),
)
QUICK_VARIANTS = ("basic", "notellm2")
# REFERENCE §9, MQwen-Base (CLIP ViT-B): all-pairs R@100 / short-query R@100, in %
PAPER = {"basic": (74.02, 48.15), "micl": (75.82, 53.32), "late_fusion": (75.92, 52.74), "notellm2": (76.50, 55.72)}


class Progress:
    """One line per event: stage k/n, what runs, elapsed and an ETA.

    The plan's weights are minutes measured on 2 idle cores. Once a tenth of the plan is done,
    the ETA scales what is left by this machine's pace so far; before that it is the plan's own.
    """

    def __init__(self, plan: list[tuple[str, float]]):
        self.plan = plan  # (stage, minutes)
        self.total = sum(w for _, w in plan)
        self.done = 0.0
        self.started = time.time()

    def say(self, stage: str, what: str) -> None:
        idx = [s for s, _ in self.plan].index(stage) + 1
        elapsed = (time.time() - self.started) / 60
        pace = elapsed / self.done if self.done >= 0.1 * self.total else 1.0
        eta = max(self.total - self.done, 0.0) * pace
        print(f"[demo] stage {idx}/{len(self.plan)} {stage}: {what} (elapsed {elapsed:.1f} min, "
              f"ETA ~{eta:.1f} min)", flush=True)

    def advance(self, minutes: float) -> None:
        self.done += minutes

    def skip(self, minutes: float) -> None:
        """Planned work that turned out not to be needed (a kept or reused run)."""
        self.total -= minutes


def variant_config(config: str | Path, base_overrides: list[str], name: str, overrides: list[str], out: Path) -> RunConfig:
    return load_run_config(config, [*base_overrides, *overrides, f"train.name={name}",
                                    f"train.storage_path={out / 'ablation'}"])


def evaluate_modalities(final: dict, data_dir: str) -> dict:
    """Test recall per modality of one finished run, measured once on its export (the run was
    chosen on validation; this is the only read of the test pairs). Writes the `both` metrics
    to the run's test_metrics.json for the leaderboard. Returns {modality: (metrics, per_query)}."""
    import torch

    from core.checkpoint import load_export

    model, _, cfg = load_export(final["export"])
    model.eval()
    with torch.no_grad():
        out = {m: validation_recall(model, data_dir, cfg, "cpu", modality=m, split="test", return_per_query=True)
               for m in _modalities(cfg)}
    if final.get("run_dir") and not is_remote(final["run_dir"]):
        (Path(final["run_dir"]) / TEST_METRICS_FILE).write_text(json.dumps(out["both"][0], indent=2))
    return out


def _modalities(cfg: RunConfig) -> tuple[str, ...]:
    """`image` only applies to a model that reads images (the text-only variant's row is n/a)."""
    return MODALITIES if needs_image(cfg.model) else tuple(m for m in MODALITIES if m != "image")


def evaluate_untrained(cfg: RunConfig) -> tuple[dict, dict]:
    """No-training rows on the test split: the untrained NoteLLM-2 per modality, and the raw
    frozen vision feature (pooled MobileNetV2, what late fusion hands the model)."""
    import torch

    from core.model.builders import build_model

    model, _ = build_model(cfg.model, cfg.loss, seed=cfg.train.seed)
    model.eval()
    with torch.no_grad():
        untrained = {m: validation_recall(model, cfg.data.path, cfg, "cpu", modality=m, split="test",
                                          return_per_query=True) for m in _modalities(cfg)}
        vision = {"both": validation_recall(model, cfg.data.path, cfg, "cpu", split="test", return_per_query=True,
                                            kind="image-features")}
    return untrained, vision


def finished_run(cfg: RunConfig) -> dict | None:
    """final_metrics.json of a completed run with this exact config, else None."""
    path = Path(cfg.train.storage_path) / cfg.train.name / "final_metrics.json"
    if not path.exists():
        return None
    final = json.loads(path.read_text())
    return final if final.get("config") == cfg.to_dict() and final.get("export") else None


def best_trial(sweep: dict | None) -> dict | None:
    """final_metrics.json of the sweep's best trial if it finished (ASHA-stopped trials write
    none) and exported a model; None otherwise (remote storage included)."""
    run_dir = ((sweep or {}).get("best") or {}).get("run_dir")
    path = Path(run_dir) / "final_metrics.json" if run_dir and not is_remote(run_dir) else None
    if path is None or not path.exists():
        return None
    final = json.loads(path.read_text())
    return final if final.get("export") and final.get("config") else None


def same_run(a: dict, b: dict) -> bool:
    """Two RunConfig dicts train the same model: equal apart from the run's name and storage."""
    def strip(d: dict) -> dict:
        return {**d, "train": {k: v for k, v in d["train"].items() if k not in ("name", "storage_path")}}

    return strip(a) == strip(b)


def _get(cfg: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return cfg.get(section, {}).get(key)


def ablation_markdown(results: list, ks: list[int]) -> str:
    """Rows = variant x modality, columns = R@K with its 95 % interval (all / short query / short
    target), plus the paper's figures. `results`: [(name, label, {modality: (metrics, per_query)})]."""
    head = ["variant", "modality"] + [f"{s} R@{k}" for s in SUBSETS for k in ks] + ["paper all / short-query R@100"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label, by_mod in results:
        shown = [m for m in MODALITIES if m in by_mod] if name == "image_features" else MODALITIES
        for m in shown:  # a modality a model cannot read (text-only's image) shows n/a
            metrics = (by_mod.get(m) or ({}, None))[0]
            cells = [label if m == "both" else "", m]
            cells += [format_recall_ci((metrics.get(s) or {}).get(f"R@{k}"), ((metrics.get("ci95") or {}).get(s) or {}).get(f"R@{k}"))
                      for s in SUBSETS for k in ks]
            paper = PAPER.get(name)
            cells.append(f"{paper[0]:.2f} / {paper[1]:.2f}" if paper and m == "both" else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COMPARISONS = (  # (a, b, why): each claimed difference gets a paired interval on the same test queries
    ("notellm2", "untrained", "does training help?"),
    ("notellm2", "image_features", "does the model beat the raw vision feature it fuses?"),
    ("micl", "basic", "paper: mICL over basic MLRM"),
    ("late_fusion", "basic", "paper: late fusion over basic MLRM"),
    ("notellm2", "basic", "paper: both over basic MLRM"),
    ("only_late_fusion", "text_only", "late fusion alone over the text-only model"),
)


def comparisons(evaluated: list, k: int) -> tuple[str, dict]:
    """Paired differences (a - b, `both` modality) at R@k on all pairs and short queries, in points."""
    per_query = {name: by_mod["both"][1] for name, _, by_mod in evaluated if "both" in by_mod}
    labels = {name: label for name, label, _ in evaluated}
    lines = [f"| comparison | all R@{k} diff (95 % CI) | short-query R@{k} diff (95 % CI) | reading |", "|---|---|---|---|"]
    out = {}
    for a, b, why in COMPARISONS:
        if a not in per_query or b not in per_query:
            continue
        diff = paired_difference(per_query[a], per_query[b], [k])
        out[f"{a} - {b}"] = diff
        cells, readings = [], []
        for subset in ("all", "short_query"):
            d = (diff.get(subset) or {}).get(f"R@{k}")
            if d is None:
                cells.append("n/a")
                continue
            lo, hi = d["ci95"]
            cells.append(f"{100 * d['mean']:+.1f} ({100 * lo:+.1f} … {100 * hi:+.1f})")
            readings.append(f"{subset}: " + ("a better" if lo > 0 else "b better" if hi < 0 else "within noise"))
        lines.append(f"| {labels[a]} − {labels[b]} | {cells[0]} | {cells[1]} | {why} {'; '.join(readings)} |")
    return "\n".join(lines) + "\n", out


def write_report(out: Path, evaluated: list, run_dirs: dict, probe: RunConfig, quick: bool) -> dict:
    """ablation.md / ablation.json (test-split tables with intervals and paired differences) and
    the leaderboard of everything under `out`; prints the tables; returns `write_leaderboard`'s dict."""
    ks = probe.eval.ks
    table = ablation_markdown(evaluated, ks)
    k = parse_metric_key(probe.eval.metric)[1]
    diff_table, diffs = comparisons(evaluated, k)
    first = evaluated[0][2]["both"][0] if evaluated and "both" in evaluated[0][2] else {}
    header = (f"Ablation on the {probe.data.corpus} demo corpus ({'quick' if quick else 'full'} demo). Every run was chosen "
              f"on the validation split; these are test-split numbers, read once. Recall in % with 95 % bootstrap "
              f"intervals over queries; {first.get('num_queries', '?')} test queries, {first.get('pool', '?')} pool of "
              f"{first.get('pool_size', '?')} notes, {first.get('ties', '?')} ties; one seed per variant.")
    (out / "ablation.md").write_text(f"{header}\n\n{table}\nPaired differences (a − b, points, same test queries):"
                                     f"\n\n{diff_table}")
    (out / "ablation.json").write_text(json.dumps(
        {"variants": {name: {"label": label, "run_dir": run_dirs.get(name), "metrics": {m: v[0] for m, v in by_mod.items()}}
                      for name, label, by_mod in evaluated}, "differences": diffs},
        indent=2, default=str))
    from rayjobs.leaderboard import write_leaderboard

    board = write_leaderboard(out, out_dir=out, metric=probe.eval.metric, mode="max")
    print("\n" + header + "\n\n" + table + "\n" + diff_table, flush=True)
    return board


def run_demo(out: Path, quick: bool, num_trials: int | None, steps: int | None, space: str | Path = DEMO_SPACE) -> dict:
    """All stages (module docstring) into `out`; `space` is the sweep YAML, whose `base_config`
    is also the ablation's run config."""
    from rayjobs.train import ensure_data, ensure_ray, resolve_paths, run_training
    from search_spaces.schema import ParameterSpec, load_sweep

    out = out.resolve()
    spec = load_sweep(space)
    config = spec.base_config
    base_cfg = load_run_config(config)
    corpus = base_cfg.data.corpus
    steps = steps or (8 if quick else base_cfg.train.max_steps)
    # the step budget is pinned for the sweep and every ablation run alike
    base = [f"data.path={out / 'data' / corpus}", *([f"train.max_steps={steps}"] if steps else []),
            f"train.checkpoint_every={0 if quick else base_cfg.train.checkpoint_every}"]
    variants = [v for v in VARIANTS if not quick or v[0] in QUICK_VARIANTS]
    trials = num_trials if num_trials is not None else (1 if quick else 3)
    # minutes per stage on 2 idle cores (2026-11-30): data + Ray start 0.25, a sweep trial 1.9
    # (a training run plus Tune's own start-up), the untrained baseline 0.7, a training run 1.5,
    # the image + text evaluation of one run 0.45
    per_trial, per_run, per_eval = 1.9, 1.5, 0.45
    plan = [("data", 0.25), ("sweep", per_trial * trials), *([] if quick else [("baseline", 0.7)]),
            ("ablation", per_run * len(variants)), ("evaluate", per_eval * len(variants)), ("report", 0.05)]
    progress = Progress(plan)

    probe = resolve_paths(variant_config(config, base, "probe", [], out))
    progress.say("data", f"{corpus} corpus -> {probe.data.path}")
    ensure_data(probe)
    ensure_ray()
    progress.advance(0.25)

    sweep, best = None, None
    if trials > 0:
        for item in base:  # the demo's data dir / step budget, pinned for every trial
            key, _, value = item.partition("=")
            spec.parameters[key] = ParameterSpec(key=key, type="fixed", value=yaml.safe_load(value))
        sweep_dir = out / "tune" / "demo"
        progress.say("sweep", f"{trials} Tune trial(s) over L, alpha, tau -> {sweep_dir}")
        sweep = run_sweep(spec, storage=str(out / "tune"), name="demo", num_samples=trials,
                          resume=sweep_dir.exists() and any(sweep_dir.iterdir()))
        progress.advance(per_trial * trials)
        best = best_trial(sweep)
        if best is not None:
            # the ablation runs at the tuned point: the best trial's whole config, one switch changed
            config = out / "ablation_base.yaml"
            dump_run_config(RunConfig.from_dict(best["config"]), config)
            swept = ", ".join(f"{k}={short_value(_get(best['config'], k))}" for k, p in spec.parameters.items() if p.type != "fixed")
            print(f"[demo] ablation base = the sweep's best trial {Path(best['run_dir']).name} ({swept}): {config}", flush=True)
        else:
            print(f"[demo] the sweep's best trial left no final_metrics.json with an export (stopped early, or "
                  f"storage this driver cannot read): the ablation runs on {config}", flush=True)

    evaluated = []
    if not quick:
        progress.say("baseline", "no training on the test split: untrained NoteLLM-2 (3 modalities), raw vision feature")
        untrained, vision = evaluate_untrained(resolve_paths(variant_config(config, base, "untrained", VARIANTS[3][2], out)))
        evaluated.append(("image_features", "raw vision feature (no training)", vision))
        evaluated.append(("untrained", "untrained NoteLLM-2", untrained))
        progress.advance(0.7)

    results = []
    for i, (name, label, overrides) in enumerate(variants, 1):
        cfg = resolve_paths(variant_config(config, base, name, overrides, out))
        final = finished_run(cfg)
        if final is None and best is not None and same_run(best["config"], cfg.to_dict()):
            progress.skip(per_run)
            progress.say("ablation", f"run {i}/{len(variants)}: {label} is the sweep's best trial, not trained again")
            final = best
        elif final is None:
            progress.say("ablation", f"run {i}/{len(variants)}: {label} ({', '.join(overrides)})")
            final = run_training(cfg)
            progress.advance(per_run)
        else:
            progress.skip(per_run)
            progress.say("ablation", f"run {i}/{len(variants)}: {label} already finished, kept")
        results.append((name, label, final))

    run_dirs = {}
    for i, (name, label, final) in enumerate(results, 1):
        others = [m for m in _modalities(RunConfig.from_dict(final["config"])) if m != "both"]
        progress.say("evaluate", f"{i}/{len(results)}: {label} on the test split, modalities both, {', '.join(others)}")
        evaluated.append((name, label, evaluate_modalities(final, probe.data.path)))
        run_dirs[name] = final.get("run_dir")
        progress.advance(per_eval)

    progress.say("report", "ablation table and leaderboard")
    board = write_report(out, evaluated, run_dirs, probe, quick)
    print(f"[demo] done in {(time.time() - progress.started) / 60:.1f} min: {out / 'ablation.md'}, "
          f"{board['html']}", flush=True)
    return {"out": str(out), "ablation": evaluated, "sweep": sweep, "leaderboard": board}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayjobs.demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", default=None, help="where data, runs, sweep and reports go (default runs/demo; "
                                                    "--quick: runs/demo-quick)")
    parser.add_argument("--quick", action="store_true", help="1 sweep trial and the basic-MLRM run beside it (NoteLLM-2 is the trial), 8 steps each, no "
                             "untrained baseline: 4.5 min measured on 2 idle cores")
    parser.add_argument("--trials", type=int, default=None, help="sweep trials (default 3; --quick 1; 0 skips)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: demo.yaml's)")
    parser.add_argument("--space", default=DEMO_SPACE, type=Path,
                        help="sweep YAML; its base_config is also the ablation runs' config (default "
                             "search_spaces/demo.yaml; search_spaces/smoke.yaml runs every stage on tiny models in minutes)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 0 or args.steps is not None and args.steps < 1:
        print("error: --trials must be >= 0 and --steps >= 1", file=sys.stderr)
        return 2
    try:
        out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
        run_demo(out, args.quick, args.trials, args.steps, space=args.space)
    except (ConfigError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
