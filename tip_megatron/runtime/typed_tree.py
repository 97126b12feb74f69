"""Typed trees of frozen dataclasses <-> nested dicts, dotted `key=value` overrides, and the
checks every config section's `validate(prefix)` shares. Pure Python (yaml for overrides
only; no torch), so the CLI's --help and `tip-megatron config` stay light.

    data = merge(yaml.safe_load(text), parse_overrides(["parallel.tp=2"]))
    cfg = from_dict(RunConfig, data)        # unknown keys, wrong types: ValueError naming the key
    config_to_dict(cfg) == data-like dict; leaf_keys(RunConfig) == ["student.ckpt", ...]

The tree's shape is its type hints: a field typed with a dataclass is a section (a nested
mapping), `tuple[X, ...]` a list, `dict[str, Any]` a mapping, `Optional`/`Union` the first
alternative that accepts the value. Values are checked by type here and by range in each
section's `validate(prefix)` (the config layer calls them); `at_least` and `check_choice`
are the one-line messages those methods share: `<dotted key>=<value>: <what is accepted>`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Sequence, Union

__all__ = ["at_least", "check_choice", "check_seed", "config_to_dict", "from_dict", "is_dataclass_type",
           "leaf_keys", "merge", "parse_overrides"]


def is_dataclass_type(tp: Any) -> bool:
    """`tp` is a dataclass class (a section of the tree), not an instance."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return coerce(value, inner[0], key)
    for alternative in inner:  # e.g. `bool or str`: the first that accepts the value
        try:
            return coerce(value, alternative, key)
        except ValueError:
            pass
    names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
    raise ValueError(f"{key}={value!r}: expected {names}")


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{key}={value!r}: expected a mapping with string keys, "
                             "e.g. {enable_thinking: false}")
        return dict(value)
    if isinstance(value, str):  # a tuple field given one string: a list of one
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: expected a list, got {value!r}")
    (elem,) = typing.get_args(tp)[:1]
    return tuple(coerce(v, elem, key) for v in value)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (parsed YAML) as type `tp`; ValueError naming `key` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of "
                             f"{sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (dict, tuple):
        return _coerce_container(value, tp, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r}: expected float") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{key}={value!r}: expected {tp.__name__}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors naming the key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s}; accepted under "
                         f"'{prefix.rstrip('.') or '<root>'}': {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section that checks itself on construction
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def config_to_dict(cfg) -> dict:
    """The tree as plain dicts and lists (what `yaml.safe_dump` writes)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree rooted at dataclass `cls`, in field order."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_dataclass_type(hints[f.name]):
            keys += leaf_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


# ------------------------------------------------------------------ overrides
def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["a.b=1", "c=[x, y]"]` -> nested dict; values parsed as YAML scalars/lists."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. parallel.tp=2)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml_value(raw, f"override {item!r}") if raw.strip() else None)
    return data


def yaml_value(text: str, where: str) -> Any:
    """yaml.safe_load, its syntax errors as one line: `where: YAML syntax error at line L,
    column C: <problem>` (line and column 1-based, as editors count)."""
    # yaml loads here, not at import: `tip-megatron --help` imports this module and stays light.
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML "
                         "(indent with spaces, `key: value`, quote values holding `:` or `#`)") from None


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, section by section."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------ shared checks
def at_least(prefix: str, section: Any, **minimums: int) -> None:
    """Each named field of `section` >= its minimum, else `<prefix><field>=<value>: must be >= m`."""
    for name, minimum in minimums.items():
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{prefix}{name}={value!r}: must be >= {minimum}")


def check_choice(prefix: str, section: Any, name: str, accepted: Iterable[Any]) -> None:
    """`section.<name>` is one of `accepted`, else the one-line message listing them."""
    accepted = list(accepted)
    value = getattr(section, name)
    if value not in accepted:
        raise ValueError(f"{prefix}{name}={value!r}: accepted values are {accepted}")


def check_seed(key: str, value: int) -> None:
    """A seed numpy's global seed and the sampler's key accept (32 bits)."""
    if not 0 <= value < 2**32:
        raise ValueError(f"{key}={value!r}: must be an integer in [0, 2**32)")
