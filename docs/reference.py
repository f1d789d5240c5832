"""The reference pages' Markdown, written from the code so that it cannot drift: every
configuration key (connectors/config.py), every command and option (flows/cli.py), and
the code map (each module's docstring).

`hooks.py` puts the Markdown into the pages when `mkdocs build` runs; nothing here is
committed as text.
"""

from __future__ import annotations

import ast
import re
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import click
import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
# The folders of the code map, in the order a newcomer meets them.
MAP_FOLDERS = ("pipeline", "connectors", "flows", "deploy", "bench")
# Within a folder, its own modules first, then its sub-packages in the order they may
# import one another (tests/test_layering.py checks that order).
MAP_LAYERS = {
    "pipeline": ("serving", "feedback", "training", "promotion"),
    "connectors": ("feedback", "training", "serving"),
}
_CODE_SPAN = re.compile(r"(`[^`]*`)")


def _escape(text: str) -> str:
    """Text for Markdown: characters that would start emphasis or an HTML tag are
    escaped, except inside code spans."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        escaped = re.sub(r"([\\*_|])", r"\\\1", parts[i])
        parts[i] = escaped.replace("<", "&lt;").replace(">", "&gt;")
    return "".join(parts)


def _cell(text: str) -> str:
    """Text for a table cell: escaped, and a pipe inside a code span escaped too."""
    return _escape(text).replace("`|`", "`\\|`").replace("\n", " ")


# Configuration


def _fields(model: type) -> dict[str, FieldInfo]:
    """A section's fields: a pydantic model's, or a pydantic dataclass's."""
    fields = getattr(model, "__pydantic_fields__", None)
    return dict(fields if fields is not None else model.model_fields)


def _toml(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type(annotation: Any) -> str:
    """A field's type in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " or ".join(_toml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (", or unset" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type(args[0])}s" if args else "list"
    if origin is dict or annotation is dict:
        return "table"
    names = {int: "integer", float: "number", str: "string", bool: "true or false"}
    if annotation is SecretStr:
        return "secret string"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    words = []
    for m in field.metadata:
        for kind, sign in ((annotated_types.Ge, "≥"), (annotated_types.Gt, ">")):
            if isinstance(m, kind):
                words.append(f"{sign} {_toml(getattr(m, kind.__name__.lower()))}")
        for kind, sign in ((annotated_types.Le, "≤"), (annotated_types.Lt, "<")):
            if isinstance(m, kind):
                words.append(f"{sign} {_toml(getattr(m, kind.__name__.lower()))}")
        if isinstance(m, annotated_types.MinLen) and m.min_length == 1:
            words.append("not empty")
    return ", ".join(words)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{_toml(value)}`"


def configuration() -> str:
    """One table per section of the configuration file, from the models that check it."""
    from connectors.config import ENV_PREFIX, Settings
    from pipeline.training.options import RUN_CONTROLS

    out = []
    for section, info in Settings.model_fields.items():
        model = info.annotation
        doc = " ".join((model.__doc__ or "").split())
        out += [f"## [{section}]", "", _escape(doc), ""]
        out += [f"Environment: `{ENV_PREFIX}{section.upper()}__<KEY>`.", ""]
        out += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for name, field in _fields(model).items():
            if section == "train" and name in RUN_CONTROLS:
                continue
            kind = _type(field.annotation)
            bounds = _bounds(field)
            kind = f"{kind}, {bounds}" if bounds else kind
            what = field.description or ""
            out.append(
                f"| `{name}` | {_cell(kind)} | {_default(field)} | {_cell(what)} |".replace(
                    "|  |", "| |"
                )
            )
        out.append("")
    return "\n".join(out)


# The command line


def _help(text: str) -> str:
    """A command's help as Markdown paragraphs."""
    paragraphs = [" ".join(p.replace("\b", "").split()) for p in text.split("\n\n")]
    return "\n\n".join(_escape(p) for p in paragraphs if p)


def commands() -> str:
    """Every `kto-loop` command: what it does, its usage and its options."""
    from flows.cli import app

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="kto-loop")
    out = []
    for name in group.list_commands(root):
        command = group.commands[name]
        ctx = click.Context(command, info_name=name, parent=root)
        usage = " ".join(["kto-loop", name, *command.collect_usage_pieces(ctx)])
        out += [f"## kto-loop {name}", "", _help(command.help or ""), ""]
        out += ["```text", usage, "```", ""]
        for param in command.params:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            opts, what = record
            line = f"- `{opts}`"
            out.append(f"{line}: {_help(what)}" if what else line)
        out.append("")
    return "\n".join(out)


# The code map


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring, or nothing."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _map_order(path: Path) -> tuple[int, tuple[str, ...]]:
    """Where a module goes in the code map: by sub-package in layering order, then by
    path."""
    parts = path.relative_to(ROOT).parts
    layers = MAP_LAYERS.get(parts[0], ())
    sub = parts[1] if len(parts) > 2 else ""
    return (layers.index(sub) + 1 if sub in layers else 0, parts)


def code_map() -> str:
    """Each package and module with the first paragraph of its docstring, sub-packages
    in layering order."""
    out = []
    for folder in MAP_FOLDERS:
        out += [f"### {folder}/", ""]
        paths = sorted((ROOT / folder).rglob("*.py"), key=_map_order)
        for path in paths:
            rel = path.relative_to(ROOT)
            if any(part == "build" or part.startswith(".") for part in rel.parts):
                continue
            summary = _summary(path)
            if path.name == "__init__.py" and not summary:
                continue
            shown = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
            out.append(f"- `{shown}`: {_escape(summary)}" if summary else f"- `{shown}`")
        out.append("")
    return "\n".join(out)
