"""Generate the README's configuration reference from the config dataclasses.

    python -m rayjobs.configref            # print the Markdown
    python -m rayjobs.configref --write README.md   # replace the block between the markers

Each field's documentation is the string literal written right after it in core/config.py, so
the reference cannot drift from the code (tests/rayjobs/test_configref.py checks the README).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

from core import config

BEGIN = "<!-- configref:begin -->"
END = "<!-- configref:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} read from the class body (string literal after each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return "null" if value is None else repr(value).replace("'", "") if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)


def render() -> str:
    lines = ["Set in a run YAML (`rayjobs/configs/*.yaml`) or with `--set section.key=value`.", ""]
    for section in dataclasses.fields(config.RunConfig):
        cls = section.type if isinstance(section.type, type) else getattr(config, section.type)
        docs = field_docs(cls)
        lines += [f"**`{section.name}`** — {inspect.getdoc(cls).splitlines()[0]}", "",
                  "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            lines.append(f"| `{section.name}.{f.name}` | `{_default(f)}` | {docs.get(f.name, '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write(readme: Path) -> bool:
    """Replace the marked block in `readme`; returns True when the file changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayjobs.configref", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README", help="rewrite the block between the configref markers")
    args = parser.parse_args(argv)
    if args.write:
        changed = write(Path(args.write))
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
