"""Leaderboard of every training run and Tune trial under a storage path: CSV, Markdown, HTML.

Local (a sweep directory, or any directory holding runs):
    python -m rayjobs.leaderboard --storage runs/tune/smoke
    python -m rayjobs.leaderboard --storage runs --out runs/leaderboard --metric short_query/R@100
On a cluster (the storage must be readable by the job's driver, e.g. a shared filesystem):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m rayjobs.leaderboard --storage /mnt/shared/notellm2/tune/paper

Sources, all found by walking the storage path:
  * `final_metrics.json` of each Train run (written by `rayjobs.train.run_training`): a complete
    run and its validation recall (columns `val/...`, what the ranking reads);
  * `test_metrics.json` beside it (written by the demo's final evaluation, or by
    `rayjobs.evaluate --out RUN/test_metrics.json`): test recall with 95 % intervals (columns
    `test/...`), read for reporting only, never for ranking;
  * Tune trial directories (`result.json`, `progress.csv`): trials stopped early by ASHA, or
    interrupted, appear with their last validation; trials are joined to their runs by `run_dir`;
  * learning curves: `history` in the run's last checkpoint `state.json`, else Tune's progress.csv.
A corrupt `final_metrics.json`, or a run directory without one and without a Tune trial, is
skipped, counted and printed; it never stops the leaderboard.

Rows are ranked by the validation metric and say so. A `kind` column tells sweep trials (a Tune
trial id) from single runs (ablation variants, baselines); the plots of a knob show only trials.
Recall cells carry their 95 % bootstrap interval where the run recorded one (CSV: `<col> lo` and
`<col> hi` columns; HTML: error bars). A Matryoshka run (`loss.matryoshka_dims`) adds all-pairs
recall columns per trained width, `val/dim16/R@10`, ... (and `test/dim16/...`).

Writes `leaderboard.csv`, `leaderboard.md` and a self-contained `leaderboard.html` (no network:
inline CSS and SVG plots of recall vs alpha, L and tau init, and per-run loss curves).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from core.metrics import (
    CI_SUFFIXES,
    SPLIT_PREFIXES,
    SUBSETS,
    flatten_recall,
    flatten_recall_ci,
    parse_dim_metric_key,
    parse_metric_key,
)
from core.paths import is_remote, local_only

TEST_METRICS_FILE = "test_metrics.json"
"""A run directory's final test evaluation (`core.evaluation.evaluate_embeddings` metrics)."""
CONFIG_COLUMNS = (  # column -> (section, key) in the RunConfig dict; L, alpha, temperature_init are public names
    ("L", ("model", "num_visual_tokens")),
    ("alpha", ("loss", "alpha")),
    ("temperature_init", ("loss", "temperature_init")),
)
MORE_CONFIG = (
    ("prompt_mode", ("model", "prompt_mode")),
    ("late_fusion", ("model", "late_fusion")),
    ("lr", ("train", "lr")),
    ("lora_rank", ("model", "lora_rank")),
)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


# ----------------------------------------------------------------------------- collection

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _last_result(result_json: Path) -> dict | None:
    """Last parseable line of a Tune result.json (one JSON object per line; the tail may be torn)."""
    try:
        lines = result_json.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def _history_from_checkpoints(run_dir: Path, checkpoint: str | None) -> list[tuple[int, float]]:
    """(step, loss) pairs from the run's final (else latest) checkpoint state.json."""
    candidates = []
    if checkpoint and not is_remote(checkpoint):
        candidates.append(Path(checkpoint) / "state.json")
    candidates += sorted(run_dir.glob("checkpoint_*/state.json"), reverse=True)
    for state_file in candidates:
        try:
            history = _read_json(state_file).get("history") or []
            points = [(int(h["step"]), float(h["loss"])) for h in history if h.get("loss") is not None]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if points:
            return points
    return []


def _history_from_progress(trial_dir: Path) -> list[tuple[int, float]]:
    progress = trial_dir / "progress.csv"
    points = []
    try:
        with progress.open() as f:
            for row in csv.DictReader(f):
                try:
                    points.append((int(float(row["step"])), float(row["loss"])))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        return []
    return points


def _flat_params_to_config(params: dict) -> dict:
    """Tune params `{"loss.alpha": 3}` -> `{"loss": {"alpha": 3}}` (when a run wrote no config)."""
    out: dict = {}
    for key, value in params.items():
        section, _, name = str(key).partition(".")
        if name:
            out.setdefault(section, {})[name] = value
    return out


def _row(run_name: str, run_dir: Path, metrics: dict, config: dict, status: str) -> dict:
    row: dict[str, Any] = {"run": run_name, "status": status, "run_dir": str(run_dir)}
    for column, (section, key) in CONFIG_COLUMNS + MORE_CONFIG:
        row[column] = (config.get(section) or {}).get(key)
    if (config.get("model") or {}).get("lora") is False:
        row["lora_rank"] = None  # full fine-tune: the rank means nothing
    row["temperature_final"] = metrics.get("temperature")
    row["loss"] = metrics.get("loss")
    val = SPLIT_PREFIXES["val"]
    for key, value in metrics.items():  # a run reports validation recall (and its interval) unprefixed
        base = key.removesuffix(CI_SUFFIXES[0]).removesuffix(CI_SUFFIXES[1])
        if parse_dim_metric_key(base) is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            row[val + key] = float(value)
    row["steps"] = metrics.get("steps", metrics.get("step"))
    row["wall_seconds"] = metrics.get("wall_seconds", metrics.get("time_total_s"))
    row["checkpoint"] = metrics.get("checkpoint", metrics.get("checkpoint_path"))
    row["eval_metric"] = (config.get("eval") or {}).get("metric")
    return row


def collect_runs(storage: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every run and trial under `storage` -> (rows, skipped [(path, reason)])."""
    root = Path(storage)
    rows: dict[str, dict] = {}  # keyed by the resolved run directory
    skipped: list[tuple[str, str]] = []
    for path in sorted(root.rglob("final_metrics.json")):
        run_dir = path.parent
        try:
            final = _read_json(path)
            if not isinstance(final, dict) or not isinstance(final.get("config"), dict):
                raise ValueError("not a final_metrics mapping with a 'config'")
        except (OSError, ValueError) as err:
            skipped.append((str(path), f"corrupt final_metrics.json ({str(err)[:80]})"))
            continue
        name = (final["config"].get("train") or {}).get("name") or run_dir.name
        row = _row(name, run_dir, final, final["config"], "complete")
        row["history"] = _history_from_checkpoints(run_dir, final.get("checkpoint"))
        _add_test_metrics(row, run_dir, skipped)
        rows[str(run_dir.resolve())] = row

    for result_json in sorted(root.rglob("result.json")):
        trial_dir = result_json.parent
        if not (trial_dir / "params.json").exists():
            continue  # not a Tune trial directory
        last = _last_result(result_json)
        if last is None:
            skipped.append((str(trial_dir), "Tune trial without a readable result"))
            continue
        run_dir = Path(last["run_dir"]) if last.get("run_dir") else trial_dir
        key = str(run_dir.resolve())
        trial_id = last.get("trial_id")
        if key in rows:
            rows[key]["trial_id"] = trial_id
            if not rows[key]["history"]:
                rows[key]["history"] = _history_from_progress(trial_dir)
            continue
        config: dict = {}
        try:
            config = yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = _flat_params_to_config(last.get("config") or {})
        status = "trained, no final_metrics" if last.get("train_done") else "stopped early / interrupted"
        row = _row(last.get("run_name") or trial_dir.name, run_dir, last, config, status)
        row["trial_id"] = trial_id
        row["history"] = _history_from_checkpoints(run_dir, last.get("checkpoint_path")) or _history_from_progress(trial_dir)
        rows[key] = row

    for row in rows.values():
        row["kind"] = "trial" if row.get("trial_id") else "run"
    known = set(rows) | {str(Path(p).parent.resolve()) for p, _ in skipped}
    run_dirs = {p.parent for p in root.rglob("run_config.yaml")} | {p.parent for p in root.rglob("checkpoint_*") if p.is_dir()}
    for run_dir in sorted(run_dirs):
        if str(run_dir.resolve()) not in known and not (run_dir / "final_metrics.json").exists():
            skipped.append((str(run_dir), "run directory without final_metrics.json"))
    return list(rows.values()), skipped


def _add_test_metrics(row: dict, run_dir: Path, skipped: list) -> None:
    """`test/...` columns (value, lo, hi) from the run's test_metrics.json, when it has one."""
    path = run_dir / TEST_METRICS_FILE
    if not path.is_file():
        return
    try:
        metrics = _read_json(path)
        flat = {**flatten_recall(metrics), **flatten_recall_ci(metrics)}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        skipped.append((str(path), f"unreadable test metrics ({str(err)[:80]}); the run is listed without them"))
        return
    test = SPLIT_PREFIXES["test"]
    row.update({test + k: v for k, v in flat.items()})
    row["test_pool"] = f"{metrics.get('pool', '')} {metrics.get('pool_size', '')}".strip()


# ----------------------------------------------------------------------------- ranking

def _sweep_metric(root: Path) -> tuple[str | None, str | None]:
    try:
        spec = _read_json(root / "sweep.json")
        return spec.get("metric"), spec.get("mode")
    except (OSError, ValueError, AttributeError):
        return None, None


def resolve_metric(storage: str | Path, rows: list[dict], metric: str | None, mode: str | None) -> tuple[str, str]:
    """The ranking metric: given > the sweep's (sweep.json) > the runs' eval.metric > R@100."""
    if metric is None:
        metric, sweep_mode = _sweep_metric(Path(storage))
        mode = mode or sweep_mode
    if metric is None:
        common = Counter(r["eval_metric"] for r in rows if r.get("eval_metric")).most_common(1)
        metric = common[0][0] if common else "R@100"
    if metric.startswith("all/"):
        metric = metric[len("all/"):]  # configs say all/R@k; workers report all-pairs recall as R@k
    for prefix in SPLIT_PREFIXES.values():
        metric = metric.removeprefix(prefix)
    if metric == "loss":
        return metric, mode or "min"
    if parse_metric_key(metric) is None:
        raise ValueError(f"ranking metric {metric!r}: allowed 'loss', 'R@<k>', 'short_query/R@<k>', 'short_target/R@<k>'")
    return SPLIT_PREFIXES["val"] + metric, mode or "max"  # choosing reads validation only


def rank_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Best first; rows without the metric last (by name); `rank` 1..n."""
    def key(r):
        v = r.get(metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            return (1, 0.0, r["run"])
        return (0, -v if mode == "max" else v, r["run"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def _split_key(column: str) -> tuple[str, str, int, int | None] | None:
    """"test/short_query/R@10" -> ("test", "short_query", 10, None), "val/dim16/R@10" -> ("val", "all",
    10, 16); None for other columns."""
    for split, prefix in SPLIT_PREFIXES.items():
        if column.startswith(prefix):
            parsed = parse_dim_metric_key(column[len(prefix):])
            return (split, parsed[1], parsed[2], parsed[0]) if parsed else None
    return None


def recall_columns(rows: list[dict]) -> list[str]:
    """val/... then test/... recall columns, by subset then K, then all-pairs recall per Matryoshka
    width (intervals are separate columns)."""
    keys = {k for r in rows for k in r if _split_key(k) and (_split_key(k)[3] is None or _split_key(k)[1] == "all")}
    splits = list(SPLIT_PREFIXES)

    def order(k):
        split, subset, kk, dim = _split_key(k)
        return splits.index(split), -1 if dim is None else dim, SUBSETS.index(subset), kk

    return sorted(keys, key=order)


def columns(rows: list[dict], metric: str) -> list[str]:
    cols = ["rank", "run", "kind", "trial_id", "status", metric]
    cols += [c for c, _ in CONFIG_COLUMNS] + ["temperature_final"] + [c for c, _ in MORE_CONFIG]
    cols += [c for c in recall_columns(rows) if c != metric]
    cols += ["test_pool"] if any(r.get("test_pool") for r in rows) else []
    cols += ["loss", "steps", "wall_seconds", "checkpoint"]
    return cols


def _interval(row: dict, column: str) -> tuple[float, float] | None:
    lo, hi = row.get(column + CI_SUFFIXES[0]), row.get(column + CI_SUFFIXES[1])
    return (lo, hi) if _finite(lo) and _finite(hi) else None


def _cell(row: dict, column: str) -> str:
    """A table cell; recall with a recorded interval reads "0.31 (0.27–0.35)"."""
    text = _fmt(row.get(column))
    ci = _interval(row, column) if _split_key(column) else None
    return f"{text} ({_fmt(ci[0])}–{_fmt(ci[1])})" if ci and text else text


# ----------------------------------------------------------------------------- writers

def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    """One column per field; each recall column is followed by its interval's `lo` and `hi` columns."""
    out_cols = []
    for c in cols:
        out_cols.append(c)
        if _split_key(c) and any(_interval(r, c) for r in rows):
            out_cols += [c + CI_SUFFIXES[0], c + CI_SUFFIXES[1]]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(out_cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in out_cols])


def _under(path: str | None, root: str | Path) -> str | None:
    """`path` relative to `root` when it lies under it (the Markdown table stays readable)."""
    if not path or is_remote(path):
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def write_markdown(rows: list[dict], cols: list[str], path: Path, title: str, note: str) -> None:
    lines = [f"# {title}", "", note, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c).replace("|", "\\|") for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    return [round(start + i * step, 10) for i in range(int(math.ceil((hi - start) / step)) + 1)]


def svg_plot(series: list[dict], title: str, xlabel: str, ylabel: str, plot_id: str, lines: bool = False,
             width: int = 420, height: int = 280) -> str:
    """A self-contained SVG scatter/line plot. series: [{"name", "points": [(x, y, tip)], "color"}]."""
    pts = [(x, y) for s in series for x, y, *_ in s["points"] if _finite(x) and _finite(y)]
    pts += [(p[0], c) for s in series for p in s["points"] if len(p) > 3 and p[3] and _finite(p[0])
            for c in p[3] if _finite(c)]  # error bars stay inside the axes
    legend, lx, ly = [], 58, 34  # legend laid out in rows above the plot area
    for s in series[:12]:
        text = html.escape(s["name"][:40])
        w = 24 + 6.8 * len(s["name"][:40])
        if lx + w > width - 8 and lx > 58:
            lx, ly = 58, ly + 14
        legend.append(f'<rect x="{lx}" y="{ly - 8}" width="9" height="9" fill="{s["color"]}"/>'
                      f'<text x="{lx + 13}" y="{ly}" class="legend">{text}</text>')
        lx += w
    left, right, top, bottom = 58, 12, ly + 10, 44
    height += top - 28  # the legend rows add height; the plot area keeps its size
    out = [f'<svg class="plot" id="{plot_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="ptitle">{html.escape(title)}</text>', *legend]
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        ylo, yhi = ylo - 0.5 * (abs(ylo) or 1), yhi + 0.5 * (abs(yhi) or 1)
    pad_x, pad_y = 0.05 * (xhi - xlo), 0.08 * (yhi - ylo)
    xlo, xhi, ylo, yhi = xlo - pad_x, xhi + pad_x, ylo - pad_y, yhi + pad_y
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - xlo) / (xhi - xlo) * pw

    def sy(y):
        return top + (1 - (y - ylo) / (yhi - ylo)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for t in _ticks(xlo, xhi):
        if xlo <= t <= xhi:
            out.append(f'<line x1="{sx(t):.1f}" y1="{top + ph}" x2="{sx(t):.1f}" y2="{top + ph + 4}" class="axis"/>'
                       f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(float(t))}</text>')
    for t in _ticks(ylo, yhi):
        if ylo <= t <= yhi:
            out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" class="grid"/>'
                       f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(float(t))}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(13,{top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>')
    for s in series:
        good = [p for p in s["points"] if _finite(p[0]) and _finite(p[1])]
        if lines and len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, *_ in sorted(good))
            out.append(f'<polyline class="curve" fill="none" stroke="{s["color"]}" stroke-width="1.5" points="{path}">'
                       f'<title>{html.escape(s["name"])}</title></polyline>')
        else:
            for x, y, *rest in good:
                tip, ci = (rest + [None, None])[:2]
                label = html.escape(tip or s["name"])
                if ci and _finite(ci[0]) and _finite(ci[1]):  # 95 % interval as an error bar
                    out.append(f'<line class="errorbar" x1="{sx(x):.1f}" y1="{sy(ci[0]):.1f}" x2="{sx(x):.1f}" '
                               f'y2="{sy(ci[1]):.1f}" stroke="{s["color"]}" stroke-width="1.2"/>')
                out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{s["color"]}" '
                           f'fill-opacity="0.8"><title>{label}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plots(rows: list[dict], metric: str) -> list[str]:
    parsed = _split_key(metric)
    shown = [metric]
    short = SPLIT_PREFIXES["val"] + f"short_query/R@{parsed[2]}" if parsed else None
    if parsed and parsed[1] == "all" and any(short in r for r in rows):
        shown.append(short)  # short notes are where the image matters most
    trials = [r for r in rows if r.get("kind") == "trial"] or rows  # a knob's plot shows the runs that vary it
    plots = []
    for column, label, pid in (("alpha", "alpha (mICL loss ratio)", "plot-alpha"), ("L", "L (visual tokens)", "plot-L"),
                               ("temperature_init", "tau init (log-scale)", "plot-tau")):
        series = [{"name": name, "color": PALETTE[i], "points": [
            (r.get(column), r.get(name), f"{r['run']}: {name} {_fmt(r.get(name))} at {column}={_fmt(r.get(column))}",
             _interval(r, name)) for r in trials]} for i, name in enumerate(shown)]
        plots.append(svg_plot(series, f"{metric} vs {column}", label, "recall" if parsed else metric, pid))
    curves = [{"name": f"#{r['rank']} {r['run']}", "color": PALETTE[i % len(PALETTE)],
               "points": [(s, l) for s, l in r.get("history") or []]} for i, r in enumerate(rows)]
    plots.append(svg_plot([c for c in curves if c["points"]], "training loss per run", "step", "loss",
                          "plot-curves", lines=True, width=860, height=320))
    return plots


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:12px 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0;position:sticky;top:0}td.text{text-align:left;white-space:nowrap}tr.best td{background:#eaf6ea}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{border:1px solid #ddd;background:#fff;font-size:11px}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#eee}svg .axis{stroke:#999}svg .ptitle{font-weight:600;font-size:12px}
.note{color:#555}"""


def write_html(rows: list[dict], cols: list[str], path: Path, title: str, note: str, metric: str,
               skipped: list[tuple[str, str]]) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="{"text" if not isinstance(r.get(c), (int, float)) or isinstance(r.get(c), bool) else "num"}">'
            f"{html.escape(_cell(r, c))}</td>" for c in cols)
        body.append(f'<tr class="run{" best" if r["rank"] == 1 and r.get(metric) is not None else ""}">{cells}</tr>')
    skipped_html = ""
    if skipped:
        items = "".join(f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in skipped)
        skipped_html = f"<h2>Skipped ({len(skipped)})</h2><ul class=\"skipped\">{items}</ul>"
    doc = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(note)}</p>"
           f"<table id=\"leaderboard\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
           f"<h2>Plots</h2><div class=\"plots\">{''.join(_plots(rows, metric))}</div>{skipped_html}</body></html>")
    path.write_text(doc)


def write_leaderboard(storage: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
                      mode: str | None = None) -> dict:
    """Collect, rank and write leaderboard.{csv,md,html}; returns paths and counts."""
    rows, skipped = collect_runs(storage)
    metric, mode = resolve_metric(storage, rows, metric, mode)
    rows = rank_rows(rows, metric, mode)
    cols = columns(rows, metric)
    out = Path(out_dir or storage)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Leaderboard: {Path(storage).resolve().name}"
    note = (f"{len(rows)} runs under {storage}, ranked by {metric} ({'higher' if mode == 'max' else 'lower'} is better)"
            + ("; ranked on the validation split, test/ columns are reported, never ranked on"
               if any(_split_key(c) and c.startswith(SPLIT_PREFIXES["test"]) for c in cols) else
               "; ranked on the validation split")
            + "; recall cells carry 95 % bootstrap intervals where recorded"
            + (f"; {len(skipped)} skipped" if skipped else ""))
    paths = {"csv": out / "leaderboard.csv", "md": out / "leaderboard.md", "html": out / "leaderboard.html"}
    write_csv(rows, cols, paths["csv"])
    write_markdown([{**r, "checkpoint": _under(r.get("checkpoint"), storage)} for r in rows], cols, paths["md"], title,
                   note + "; checkpoint paths relative to it")
    write_html(rows, cols, paths["html"], title, note, metric, skipped)
    print(f"[leaderboard] {note}", flush=True)
    for p, why in skipped:
        print(f"[leaderboard] skipped {p}: {why}", flush=True)
    for r in rows[:5]:
        print(f"[leaderboard] #{r['rank']} {r['run']} {metric} {_fmt(r.get(metric))} L={_fmt(r.get('L'))} "
              f"alpha={_fmt(r.get('alpha'))} tau0={_fmt(r.get('temperature_init'))} ({r['status']})", flush=True)
    print(f"[leaderboard] wrote {paths['csv']}, {paths['md']}, {paths['html']}", flush=True)
    return {**{k: str(v) for k, v in paths.items()}, "rows": len(rows), "skipped": len(skipped),
            "metric": metric, "mode": mode, "ranked": [r["run"] for r in rows]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rayjobs.leaderboard", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="directory to collect runs and Tune trials from (searched recursively)")
    parser.add_argument("--out", default=None, help="where leaderboard.{csv,md,html} go (default: --storage)")
    parser.add_argument("--metric", default=None, help="ranking metric, e.g. R@100 or short_query/R@100 "
                        "(default: the sweep's, else the runs' eval.metric)")
    parser.add_argument("--mode", choices=("max", "min"), default=None, help="max (recall, default) or min (loss)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refused = local_only("--storage", args.storage, copy="from") or (args.out and local_only("--out", args.out))
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    if not Path(args.storage).is_dir():
        print(f"error: --storage {args.storage} is not a directory", file=sys.stderr)
        return 2
    write_leaderboard(args.storage, args.out, args.metric, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
