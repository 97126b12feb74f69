"""`tip-megatron config show | doc`: the effective config of a run, and every config key.

    tip-megatron config show --config run.yaml parallel.tp=2   # the merged config as YAML
    tip-megatron config doc                                    # key, type, default, docstring
    tip-megatron config doc --markdown > docs/config.md        # the generated reference

The reference is read from the dataclasses themselves: their fields, type hints and
defaults, and each field's docstring (the string literal right after the field, read from
the class source with `ast`), recursing into nested dataclasses whichever module defines
them, so a new field shows up without touching this file. Nothing here imports torch at
import time (`tip-megatron --help` stays light); the commands import tip_megatron.config.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

from tip_megatron.runtime.typed_tree import is_dataclass_type

MARKDOWN_HEADER = """# Configuration reference

Generated from the config dataclasses by `tip-megatron config doc --markdown > docs/config.md`
(a test fails when this file is out of date). A run is a YAML file plus `key=value`
overrides: `tip-megatron train --config run.yaml parallel.tp=2`; `tip-megatron config show
--config run.yaml [key=value ...]` prints the effective config.
"""


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of a config tree."""

    key: str
    """Dotted key, e.g. `selection.quadrant_rule.kind`."""
    type: str
    """The field's type as written in YAML terms (`int`, `str or null`, `list of str`)."""
    default: str
    """The default as YAML/JSON text (`null`, `true`, `"auto"`, `[1, 3]`)."""
    doc: str
    """The field docstring, dedented; empty when the field has none."""


@dataclass(frozen=True)
class SectionDoc:
    """A dataclass in the tree: its dotted prefix, its docstrings and its leaf keys."""

    prefix: str
    """Dotted prefix (`""` for the root)."""
    title: str
    """`prefix (ClassName)`, or the class name at the root."""
    doc: str
    """The class docstring and, for a nested field, that field's docstring."""
    keys: tuple[KeyDoc, ...]


# ------------------------------------------------------------------ introspection
def field_docstrings(cls: type) -> dict[str, str]:
    """{field name: docstring} from the string literal that follows each annotated field in
    `cls`'s class body (PEP 257 attribute docstrings; not kept by Python at runtime), and
    from its base classes' bodies for the fields it inherits."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if base is not object and dataclasses.is_dataclass(base):
            docs.update(_own_field_docstrings(base))
    docs.update(_own_field_docstrings(cls))
    return docs


def _own_field_docstrings(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def type_name(tp: Any) -> str:
    """A type hint in YAML terms: `Optional[int]` -> `int or null`, `tuple[str, ...]` ->
    `list of str`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def config_sections(cls: type, prefix: str = "", field_doc: str = "") -> list[SectionDoc]:
    """Every dataclass of the tree rooted at `cls`, depth first, each with its leaf keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docstrings(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_dataclass_type(tp):
            nested += config_sections(tp, f"{prefix}{f.name}.", docs.get(f.name, ""))
        else:
            keys.append(KeyDoc(prefix + f.name, type_name(tp), _default_text(_default(f)),
                               docs.get(f.name, "")))
    name = prefix.rstrip(".")
    class_doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(
        f"{cls.__name__}(") else ""  # dataclass() invents `Name(a: int, ...)` when absent
    doc = "\n\n".join(d for d in (class_doc, field_doc) if d)
    title = f"{name} ({cls.__name__})" if name else cls.__name__
    return [SectionDoc(prefix, title, doc, tuple(keys))] + nested


def undocumented_keys(cls: type) -> list[str]:
    """Dotted keys of leaf fields without a docstring."""
    return [k.key for s in config_sections(cls) for k in s.keys if not k.doc]


# ------------------------------------------------------------------ rendering
def render_text(sections: list[SectionDoc]) -> str:
    lines = []
    for s in sections:
        if not s.keys:
            continue
        lines.append(f"[{s.title}]" + (f"  {_one_line(s.doc)}" if s.doc else ""))
        for k in s.keys:
            lines.append(f"  {k.key}: {k.type} = {k.default}")
            if k.doc:
                lines += [f"      {line}" for line in textwrap.wrap(_one_line(k.doc), 84, break_on_hyphens=False)]
        lines.append("")
    return "\n".join(lines)


def render_markdown(sections: list[SectionDoc]) -> str:
    out = [MARKDOWN_HEADER]
    for s in sections:
        if not s.keys:
            continue
        out += [f"## `{s.title}`" if s.prefix else f"## {s.title} (top level)", ""]
        if s.doc:
            out += [_one_line(s.doc), ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in s.keys:
            out.append(f"| `{k.key}` | {k.type} | `{k.default}` | {_cell(k.doc)} |")
        out.append("")
    return "\n".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


# ------------------------------------------------------------------ command
def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="show the effective config; document every key")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the effective config (YAML file + overrides)")
    show.add_argument("--config", help="YAML run config")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    show.set_defaults(func=_show)
    doc = sub.add_parser("doc", help="every config key with its type, default and meaning")
    doc.add_argument("--markdown", action="store_true", help="as Markdown (docs/config.md)")
    doc.set_defaults(func=_doc)


def _show(args: argparse.Namespace) -> int:
    from tip_megatron.config import dump_config, load_config  # --help start-up time (torch)

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg))
    return 0


def _doc(args: argparse.Namespace) -> int:
    from tip_megatron.config import RunConfig  # --help start-up time (torch)

    sections = config_sections(RunConfig)
    sys.stdout.write(render_markdown(sections) if args.markdown else render_text(sections))
    return 0


def reference_markdown(root: Optional[type] = None) -> str:
    """The text of docs/config.md for `root` (default: RunConfig)."""
    if root is None:
        from tip_megatron.config import RunConfig as root  # --help start-up time (torch)
    return render_markdown(config_sections(root))
