"""The command line of `python -m rayjobs.benchmark` (see the package docstring for commands)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import rayjobs.benchmark
from rayjobs.benchmark import embed, gpu_mfu, input_pipeline, mining, recall, train
from rayjobs.benchmark.harness import SIZES, Context, log, machine_info, quiet_ray_data
from rayjobs.benchmark.report import format_value, keep_foreign_sections, render_markdown

SUITE_FUNCS = {"train": train.run, "input": input_pipeline.run, "embed": embed.run, "recall": recall.run,
               "mining": mining.run, "gpu_mfu": gpu_mfu.run}
SUITES = tuple(SUITE_FUNCS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayjobs.benchmark", description=rayjobs.benchmark.__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Suites: " + ", ".join(SUITES))
    p.add_argument("--suite", action="append", choices=SUITES, help="suite to run (repeatable; default: all)")
    p.add_argument("--out", default="runs/bench", help="output directory (benchmarks.json, benchmarks.md, data, runs)")
    p.add_argument("--size", choices=tuple(SIZES), default="full", help="toy: seconds per suite (CI); full: the reported figures")
    p.add_argument("--write-md", metavar="PATH", help="also write the Markdown report here (e.g. BENCHMARKS.md)")
    p.add_argument("--from-json", metavar="PATH", help="re-render the Markdown of an earlier benchmarks.json (runs nothing)")
    return p


def run(suites, size: str, out: Path) -> dict:
    """Run `suites` at `size`, in order; the report dict that benchmarks.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(size, out)
    report = {"size": size, "machine": machine_info(), "suites": {}}
    started = time.time()
    for name in suites:
        log(f"suite {name} ({size}) ...")
        t0 = time.time()
        res = SUITE_FUNCS[name](ctx)
        res.setdefault("status", "ok")
        res["seconds"] = time.time() - t0
        report["suites"][name] = res
        met = [f"{k}={format_value(f['value'])}{'' if f['met'] is None else (' ok' if f['met'] else ' MISSED')}"
               for k, f in res.get("figures", {}).items()]
        log(f"suite {name}: {res['status']} in {res['seconds']:.0f} s " + (", ".join(met) or res.get("reason", "")))
    report["total_seconds"] = time.time() - started
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        out.mkdir(parents=True, exist_ok=True)
    else:
        quiet_ray_data()
        report = run(args.suite or list(SUITES), args.size, out)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2, default=str))
    md = render_markdown(report)
    (out / "benchmarks.md").write_text(md)
    if args.write_md:
        target = Path(args.write_md)
        target.write_text(keep_foreign_sections(md, target.read_text() if target.exists() else None))
    log(f"wrote {out / 'benchmarks.json'} and {out / 'benchmarks.md'}" + (f" and {args.write_md}" if args.write_md else ""))
    return 0
