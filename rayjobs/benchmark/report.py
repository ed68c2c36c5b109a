"""The Markdown report of a benchmark run: measured tables per suite, the prose around them read
from `report.md` (header template and per-suite notes)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "report.md"
_PART = re.compile(r"^<!-- part: (\w+) -->\n", re.MULTILINE)


def load_parts(path: Path = TEMPLATE) -> dict[str, str]:
    """The named parts of the template (text between `<!-- part: NAME -->` lines, stripped)."""
    pieces = _PART.split(path.read_text(encoding="utf-8"))
    return {name: text.strip("\n") for name, text in zip(pieces[1::2], pieces[2::2])}


def format_value(x) -> str:
    """A table cell: 3 significant digits, thousands separators from 1000 up, `–` for none."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, (int, float)):
        if not math.isfinite(x):
            return str(x)
        a = abs(x)
        return f"{x:,.0f}" if a >= 1000 else f"{x:.3g}" if a >= 0.01 else f"{x:.2e}"
    return str(x)


def _suite_tables(res: dict) -> list[str]:
    lines = ["| figure | value | target | met | what |", "|---|---|---|---|---|"]
    for key, f in res["figures"].items():
        target = f"{f['target_op']} {format_value(f['target'])}" if f["target"] is not None else "–"
        lines.append(f"| {key} | {format_value(f['value'])} | {target} | {format_value(f['met'])} | {f['what']} |")
    lines += ["", "| measurement | unit | min | median | max | n |", "|---|---|---|---|---|---|"]
    for key, a in res["absolute"].items():
        lines.append(f"| {key} | {a['unit']} | {format_value(a['min'])} | {format_value(a['median'])} | "
                     f"{format_value(a['max'])} | {a['n']} |")
    return lines + ["", f"Config: `{json.dumps(res.get('config', {}), default=str)}`", ""]


KEPT_MARKER = "<!-- sections below are not rayjobs.benchmark's: --write-md keeps them -->"
"""In BENCHMARKS.md, what follows this line comes from other commands (e.g. `rayjobs.loadtest`)."""


def keep_foreign_sections(md: str, existing: str | None) -> str:
    """`md` plus the part of the file being replaced from `KEPT_MARKER` on, so rewriting the
    benchmark's sections never drops another command's measurements."""
    if not existing or KEPT_MARKER not in existing:
        return md
    return md.rstrip("\n") + "\n\n" + existing[existing.index(KEPT_MARKER):]


def render_markdown(report: dict, parts: dict[str, str] | None = None) -> str:
    """The whole report (BENCHMARKS.md) of a `benchmarks.json` dict."""
    parts = load_parts() if parts is None else parts
    m = report["machine"]
    loads = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    header = parts["header"].format(
        size=report["size"], date=m["date"], total_seconds=report["total_seconds"], cpu=m["cpu"], cores=m["cores"],
        ram_gb=m["ram_gb"], gpu=m["gpu"] or "none", torch=m["torch"], ray=m["ray"], python=m["python"],
        load_avg_start=loads(m["load_avg_start"]), load_avg_end=loads(m.get("load_avg_end", [])))
    lines = [header, ""]
    for name, res in report["suites"].items():
        lines += [f"## {name}", ""]
        if res.get("status") != "ok":
            lines += [f"Skipped: {res.get('reason')}", ""]
        else:
            lines += _suite_tables(res)
        if name in parts:
            lines += [parts[name], ""]
    return "\n".join(lines)
