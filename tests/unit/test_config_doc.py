"""`tip-megatron config show | doc` and the generated docs/config.md."""
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import yaml

from tip_megatron.apps import cli
from tip_megatron.config import RunConfig, config_keys, config_to_dict, load_config
from tip_megatron.apps.config_cmd import config_sections, field_docstrings, reference_markdown, \
    undocumented_keys

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Inner:
    """Inner section."""

    rate: float = 0.5
    """How fast,
    in units per step."""
    names: tuple[str, ...] = ("a", "b")


@dataclass(frozen=True)
class _Outer:
    size: Optional[int] = None
    """Optional size."""
    inner: _Inner = field(default_factory=_Inner)
    """The nested one."""
    flag: bool = True
    """A flag."""


def test_sections_of_an_arbitrary_dataclass_tree():
    assert field_docstrings(_Inner) == {"rate": "How fast,\nin units per step."}
    root, inner = config_sections(_Outer)
    assert (root.prefix, root.title, root.doc) == ("", "_Outer", "")  # no invented docstring
    assert [(k.key, k.type, k.default, k.doc) for k in root.keys] == [
        ("size", "int or null", "null", "Optional size."), ("flag", "bool", "true", "A flag.")]
    assert (inner.prefix, inner.title) == ("inner.", "inner (_Inner)")
    assert inner.doc == "Inner section.\n\nThe nested one."
    assert [(k.key, k.type, k.default) for k in inner.keys] == [
        ("inner.rate", "float", "0.5"), ("inner.names", "list of str", '["a", "b"]')]
    assert undocumented_keys(_Outer) == ["inner.names"]


def _leaf_defaults(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and prefix + k not in config_keys():  # a section, not a mapping option
            out.update(_leaf_defaults(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_doc_covers_every_run_config_key_with_its_default():
    keys = [k for s in config_sections(RunConfig) for k in s.keys]
    assert sorted(k.key for k in keys) == sorted(config_keys())
    # Defaults checked against the config module's own serialisation of RunConfig().
    defaults = _leaf_defaults(config_to_dict(RunConfig()))
    assert {k.key: json.loads(k.default) for k in keys} == defaults


def test_docs_config_md_is_up_to_date():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == reference_markdown(), (
        "docs/config.md is out of date: regenerate with "
        "`tip-megatron config doc --markdown > docs/config.md`")


def test_every_config_field_has_a_docstring():
    assert undocumented_keys(RunConfig) == []


def test_config_doc_text_lists_each_key_with_type_default_and_doc(capsys):
    assert cli.main(["config", "doc"]) == 0
    out = capsys.readouterr().out
    assert "  selection.quadrant_rule.div_threshold_nats: float = 0.5\n" in out
    assert "high divergence iff reverse KL d > this many nats" in out
    for key in config_keys():
        assert f"  {key}: " in out, key


def test_config_show_prints_the_effective_config_and_round_trips(capsys, tmp_path):
    argv = ["config", "show", "--config", str(ROOT / "examples/configs/quickstart_cpu.yaml"),
            "parallel.tp=1", "selection.rho=0.25"]
    assert cli.main(argv) == 0
    shown = capsys.readouterr().out
    expected = load_config(argv[3], argv[4:])
    assert yaml.safe_load(shown) == config_to_dict(expected)
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(str(tmp_path / "shown.yaml")) == expected


def test_config_show_bad_key_is_one_line_and_exit_2(capsys):
    assert cli.main(["config", "show", "parallel.tpp=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unknown config key parallel.tpp")


def test_registering_config_and_plot_commands_imports_neither_torch_nor_matplotlib():
    code = ("import argparse, sys\n"
            "import tip_megatron.apps.config_cmd as c, tip_megatron.apps.plots.cli as p\n"
            "sub = argparse.ArgumentParser().add_subparsers()\n"
            "c.register(sub); p.register(sub)\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'yaml') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
