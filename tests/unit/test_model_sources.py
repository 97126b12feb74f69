"""The model-source registry: built-ins registered by their package, found in a fresh
process (a torchrun worker reads the name from a YAML), entry points of other packages,
lazy `module:function` providers, and the errors a user sees."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tip_megatron.checkpoint import sources
from tip_megatron.models.arch import ModelArch

ROOT = Path(__file__).parents[2]

TINY = dict(family="llama", vocab_size=14, hidden_size=16, num_layers=1, num_attention_heads=2,
            num_kv_heads=2, ffn_hidden_size=32, max_position_embeddings=16)


def _fresh_python(code: str, extra_path: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), extra_path) if p))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_a_fresh_process_finds_the_quickstart_builtins_from_a_yaml(tmp_path):
    """What a `python -m tip_megatron.train` worker does: load a YAML naming a built-in and
    validate it, with nothing imported by hand; the provider module is imported by the
    registry's discovery, and its BuiltinModel gives the quickstart's architectures."""
    (tmp_path / "run.yaml").write_text("student: {builtin: quickstart-student}\n"
                                       "teacher: {builtin: quickstart-teacher}\n")
    out = _fresh_python(f"""
        import sys
        from tip_megatron.config import load_config, validate_run
        cfg = load_config({str(tmp_path / 'run.yaml')!r})
        assert "tip_megatron.apps.quickstart" not in sys.modules  # parsing needs no provider
        validate_run(cfg, world_size=1)
        from tip_megatron.checkpoint.sources import builtin_model, builtin_names
        s = builtin_model("quickstart-student")
        print(builtin_names(), s.arch.hidden_size, s.arch.num_layers,
              builtin_model("quickstart-teacher").arch.hidden_size, s.tokenizer().vocab_size,
              "megatron" in sys.modules)
    """)
    # every built-in setup.py declares (the quickstart's list of them, `tasks.PROVIDERS`); the
    # sizes pretrain.student_arch / teacher_arch document; no megatron import to validate
    from tip_megatron.apps.quickstart.tasks import PROVIDERS

    assert out == f"{sorted(PROVIDERS)} 64 2 128 14 False"


def test_entry_points_of_another_package_register_builtins(tmp_path):
    """An installed package declares `[tip_megatron.builtin_models] name = module:function`
    (here a dist-info directory on sys.path, as pip writes it)."""
    dist = tmp_path / "tiny_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[tip_megatron.builtin_models]\ntiny-x = tiny_models:provide\n")
    (tmp_path / "tiny_models.py").write_text(textwrap.dedent(f"""
        from tip_megatron.models.arch import ModelArch
        from tip_megatron.checkpoint.sources import BuiltinModel
        CALLS = []
        def provide():
            CALLS.append(1)
            return BuiltinModel(arch=ModelArch(**{TINY!r}), full_state=lambda groups: {{}})
    """))
    out = _fresh_python("""
        import sys
        from tip_megatron.config import ModelSource
        from tip_megatron.checkpoint.sources import builtin_model, builtin_names, source_arch
        ModelSource(builtin="tiny-x").validate("teacher")
        assert "tiny_models" not in sys.modules  # resolved on first use only
        arch = source_arch(ModelSource(builtin="tiny-x"))
        builtin_model("tiny-x")
        import tiny_models
        print("tiny-x" in builtin_names(), arch.hidden_size, len(tiny_models.CALLS))
    """, extra_path=str(tmp_path))
    assert out == "True 16 1"


@pytest.fixture
def registry(monkeypatch):
    """The process-wide registry (discovered first), restored after the test."""
    sources.builtin_names()
    monkeypatch.setattr(sources, "_providers", dict(sources._providers))
    monkeypatch.setattr(sources, "_resolved", dict(sources._resolved))
    return sources


def _provider():
    return sources.BuiltinModel(arch=ModelArch(**TINY), full_state=lambda groups: {})


def test_register_lazy_string_provider_and_refuse_a_clash(registry):
    registry.register_builtin("tiny-lazy", f"{__name__}:_provider")
    registry.register_builtin("tiny-lazy", f"{__name__}:_provider")  # idempotent
    assert "tiny-lazy" in registry.builtin_names()
    assert registry.source_arch(sources.ModelSource(builtin="tiny-lazy")) == ModelArch(**TINY)
    with pytest.raises(ValueError, match="builtin model 'tiny-lazy' is already registered"):
        registry.register_builtin("tiny-lazy", _provider)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        registry.register_builtin("tiny-bad", "no_colon_here")


def test_a_provider_must_return_a_builtin_model(registry):
    registry.register_builtin("tiny-wrong", lambda: {"arch": None})
    with pytest.raises(ValueError, match="'tiny-wrong': its provider returned dict, expected a BuiltinModel"):
        registry.builtin_model("tiny-wrong")


@pytest.mark.parametrize("src,message", [
    (dict(builtin="nope"), r"^teacher.builtin='nope': accepted: \[.*'quickstart-teacher'.*\]$"),
    (dict(), r"^teacher: set exactly one of teacher.ckpt, teacher.hf, teacher.builtin \(got none\)$"),
    (dict(ckpt="/x", builtin="quickstart-teacher"), r"got \['ckpt', 'builtin'\]"),
    (dict(hf="/nonexistent/hf"), r"^teacher.hf='/nonexistent/hf': no such file or directory$"),
])
def test_source_errors_are_one_line_naming_the_key(src, message):
    with pytest.raises(ValueError, match=message):
        sources.ModelSource(**src).validate("teacher")
