"""`models.checkpoint.model_files`: which directories are model sources, and the one-line
refusal of the others (no weights are read here; test_train_to_hf.py loads real ones)."""
import json

import pytest

from tip_megatron.apps.cli import main
from tip_megatron.checkpoint.model import model_files
from tip_megatron.testing.models import tiny_arch


def _step(run, n, complete=True, meta=None):
    step = run / f"step_{n:06d}"
    (step / "dist").mkdir(parents=True)
    (step / "arch.json").write_text(json.dumps(tiny_arch("llama").to_dict()))
    if complete:
        (step / "COMPLETE").write_text(json.dumps({"step": n}))
    return step


def test_a_run_directory_resolves_to_its_newest_complete_step(tmp_path):
    run = tmp_path / "run"
    _step(run, 2), _step(run, 10), _step(run, 12, complete=False)
    (run / "model_meta" / "tokenizer").mkdir(parents=True)
    (run / "model_meta" / "meta.json").write_text(json.dumps({"params_dtype": "bfloat16"}))
    (run / "model_meta" / "hf_config.json").write_text(json.dumps({"model_type": "llama"}))
    files = model_files(run)
    assert (files.path, files.kind, files.weights) == (run / "step_000010", "training",
                                                         run / "step_000010" / "dist")
    assert files.tokenizer_dir == run / "model_meta" / "tokenizer"
    assert files.meta == {"params_dtype": "bfloat16"} and files.hf_config == {"model_type": "llama"}
    assert files.arch() == tiny_arch("llama")
    assert model_files(run / "step_000002").path == run / "step_000002"


def test_a_step_without_model_meta_has_no_tokenizer(tmp_path):
    files = model_files(_step(tmp_path / "run", 1))
    assert (files.tokenizer_dir, files.hf_config, files.meta) == (None, None, {})


@pytest.mark.parametrize("layout", ["empty", "incomplete_run", "incomplete_step", "file"])
def test_neither_kind_is_one_line_naming_what_is_accepted(tmp_path, layout, capsys):
    target = tmp_path / "x"
    if layout == "empty":
        target.mkdir()
    elif layout == "incomplete_run":
        _step(target, 3, complete=False)
    elif layout == "incomplete_step":
        target = _step(tmp_path / "run", 3, complete=False)
    else:
        target.write_text("not a checkpoint")
    expected = ("holds no complete checkpoint" if layout == "incomplete_run"
                else "is neither a tip_megatron model checkpoint")
    with pytest.raises(ValueError, match=expected):
        model_files(target)
    assert main(["convert", "mcore-to-hf", "--ckpt", str(target), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_generate_refuses_neither_kind_in_one_line(tmp_path, capsys):
    (tmp_path / "bench.jsonl").write_text('{"prompt": "1+1?"}\n')
    (tmp_path / "x").mkdir()
    argv = ["generate", "--ckpt", str(tmp_path / "x"), "--prompts", str(tmp_path / "bench.jsonl"),
            "--out", str(tmp_path / "s.jsonl"), "--chat-template-kwargs", '{"enable_thinking": false}']
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is neither a tip_megatron model checkpoint" in err


def test_chat_template_kwargs_flag_must_be_a_json_object(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(tmp_path), "--prompts", "p.jsonl", "--out", "o.jsonl",
              "--chat-template-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
