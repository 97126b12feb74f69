"""Errors before launch: `tip-megatron train` with a bad input stops in the launching
process with one line `error: <key or file>: ...` and exit code 2, before any rank (or
torchrun) is started; `--debug` shows the traceback; a bare torchrun fails on every rank
with one line, from the first rank that fails.
"""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tip_megatron.config import load_config
from tip_megatron.runtime.errors import PreflightError
from tip_megatron.train.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
#: a valid run on the quickstart's built-ins (16 positions, 4 heads, 2 layers, 14 tokens).
GOOD = ["student.builtin=quickstart-student", "teacher.builtin=quickstart-teacher",
        "data.max_prompt_len=8", "rollout.max_new_tokens=4", "data.prompts_per_step=4"]
#: CPU seconds (user + sys) the launcher may spend before it fails. CPU time, not wall
#: time: the bound is about the work done (no megatron import, no torchrun, no weights),
#: and CI machines shared by many jobs stretch wall time by 10x. Wall time is bounded
#: separately (WALL_S) against hangs; `seconds` is printed for the record.
LIMIT_S = 5.0
WALL_S = 120.0


def _hf_dir(root: Path, name: str, weights: bool = True, **config) -> str:
    d = root / name
    d.mkdir()
    base = dict(model_type="llama", vocab_size=14, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, intermediate_size=192,
                max_position_embeddings=16)
    (d / "config.json").write_text(json.dumps({**base, **config}))
    if weights:
        (d / "model.safetensors").write_bytes(b"")  # only its presence is checked here
    return str(d)


def _cases(tmp: Path) -> dict:
    """kind -> (argv after `train`, text the one line must contain)."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "wrong_field.jsonl").write_text(json.dumps({"question": "1+1="}) + "\n")
    (tmp / "no_config").mkdir()
    (tmp / "not_a_ckpt").mkdir()
    (tmp / "not_a_step").mkdir()
    hf_unsupported = _hf_dir(tmp, "gpt2", model_type="gpt2")
    hf_no_weights = _hf_dir(tmp, "no_weights", weights=False)
    hf_big_vocab = _hf_dir(tmp, "vocab32", vocab_size=32)
    (tmp / "good.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    # A non-builtin student has no embedded prompts nor tokenizer: name both.
    student = lambda k, v: ["student.builtin=null", f"student.{k}={v}",  # noqa: E731
                            f"data.prompts=[{tmp / 'good.jsonl'}]", "data.tokenizer=char"]
    late = _late_cases(tmp)
    return {
        **late,
        "unknown key": (["train.stepz=1"], "unknown config key train.stepz; accepted under 'train'"),
        "wrong type": (["train.steps=abc"], "train.steps='abc': expected int"),
        "bad value": (["rollout.temperature=-1"], "rollout.temperature"),
        "config file": (["--config", str(tmp / "nope.yaml")], "nope.yaml' not found"),
        "model path": (student("hf", "/nonexistent/m"), "student.hf='/nonexistent/m': no such file"),
        "hf without config.json": (student("hf", tmp / "no_config"), "no config.json there"),
        "hf without weights": (student("hf", hf_no_weights), "no model.safetensors"),
        "unsupported family": (student("hf", hf_unsupported), "HF model_type 'gpt2' is not supported"),
        "ckpt without meta": (["teacher.builtin=null", f"teacher.ckpt={tmp / 'not_a_ckpt'}"],
                              "teacher.ckpt=" + repr(str(tmp / "not_a_ckpt")) + ": not a tip_megatron model checkpoint"),
        "vocab mismatch": (["teacher.builtin=null", f"teacher.hf={hf_big_vocab}"],
                           "teacher: student vocab size 14 != teacher vocab size 32"),
        "prompt file missing": ([f"data.prompts=[{tmp / 'none.jsonl'}]", "data.tokenizer=char"],
                                "data.prompts[0]=" + repr(str(tmp / "none.jsonl")) + ": no such file"),
        "prompt file empty": ([f"data.prompts=[{tmp / 'empty.jsonl'}]"], "empty file"),
        "prompt field": ([f"data.prompts=[{tmp / 'wrong_field.jsonl'}]"],
                         "first record has none of the fields ['prompt', 'messages']"),
        "tokenizer path": (["data.tokenizer=/nonexistent/tok"], "data.tokenizer='/nonexistent/tok'"),
        "no chat template": (["data.apply_chat_template=true", f"data.prompts=[{tmp / 'good.jsonl'}]"],
                             "data.apply_chat_template=true: "),
        "heads vs tp": (["parallel.tp=3"], "does not divide num_attention_heads=4; accepted tp: [1, 2, 4]"),
        "layers vs pp": (["parallel.pp=4"], "pipeline stages pp*vpp = 4 exceed num_layers=2"),
        "positions": (["rollout.max_new_tokens=12"], "20 tokens exceed the student's max_position_embeddings=16"),
        "world vs layout": (["parallel.tp=2", "--nproc", "3"], "world size 3 is not divisible by tp*pp"),
        "batch vs micro-batch": (["data.prompts_per_step=3", "rollout.n=1", "train.micro_batch_size=2"],
                                 "global batch of 3 rollouts"),
        "prompts vs dp": (["data.prompts_per_step=3", "--nproc", "2"],
                          "data.prompts_per_step=3 is not divisible by the data-parallel size 2"),
        "resume path": ([f"checkpoint.resume={tmp / 'not_a_step'}"], "not a complete training checkpoint"),
        "checkpoint dir is a file": ([f"checkpoint.dir={tmp / 'empty.jsonl'}"], "exists and is not a directory"),
    }


def _jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _step(root: Path, arch: dict, **files) -> Path:
    """A directory shaped like a saved step: COMPLETE, arch.json, dist/ and `files`."""
    root.mkdir(parents=True)
    (root / "COMPLETE").write_text("")
    (root / "arch.json").write_text(json.dumps(arch))
    (root / "dist").mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def _late_cases(tmp: Path) -> dict:
    """Inputs the ranks used to find only after the model loaded (issue 21): each now stops
    in preflight. kind -> (argv after `train`, text the one line must contain)."""
    good = {"prompt": "1+1=", "answer": "2"}
    bad_json = _jsonl(tmp / "bad_line.jsonl", good, good, '{"prompt": "2+2=", ')
    bad_char = _jsonl(tmp / "bad_char.jsonl", good, {"prompt": "1+x="})
    int_prompt = _jsonl(tmp / "int_prompt.jsonl", good, {"prompt": 5})
    empty_prompt = _jsonl(tmp / "empty_prompt.jsonl", good, {"prompt": ""})
    chat = _jsonl(tmp / "chat.jsonl", {"messages": [{"role": "user", "content": "1+1="}]})
    binary = tmp / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 8)
    yaml_file = tmp / "broken.yaml"
    yaml_file.write_text("train:\n  steps: 3\n   lr: [1\n")
    student = load_config(None, GOOD)
    arch = preflight(student, 1).student_arch.to_dict()
    fake = tmp / "fake" / "step_000001"
    fake.mkdir(parents=True)
    (fake / "COMPLETE").write_text("")
    wrong_arch = _step(tmp / "other_arch" / "step_000002", {**arch, "num_layers": arch["num_layers"] + 1})
    truncated = _step(tmp / "truncated" / "step_000003", arch, **{
        "MANIFEST.json": json.dumps({"version": 1, "files": {"state.pt": {"size": 999, "crc32": "0"}}}),
        "state.pt": "x"})
    prompts = lambda f: [f"data.prompts=[{f}]", "data.tokenizer=char"]  # noqa: E731
    return {
        "bad JSONL line": (prompts(bad_json), f"data.prompts: {bad_json}, line 3: invalid JSON"),
        "characters outside the tokenizer": (prompts(bad_char), f"{bad_char}, line 2"),
        "int prompt": (prompts(int_prompt), f"{int_prompt}, line 2: field 'prompt' must be a string"),
        "empty prompt": (prompts(empty_prompt), f"{empty_prompt}, line 2"),
        "chat records without a template": (prompts(chat), f"{chat}, line 1"),
        "binary prompt file": (prompts(binary), f"data.prompts[0]={str(binary)!r}: not UTF-8 text"),
        "yaml syntax": (["--config", str(yaml_file)],
                        f"config file {str(yaml_file)!r}: YAML syntax error at line 3, column 6"),
        "fake COMPLETE marker": ([f"checkpoint.resume={fake}"],
                                 f"has a COMPLETE marker but no MANIFEST.json, dist/ or arch.json"),
        "truncated resume step": ([f"checkpoint.resume={truncated}"],
                                  f"{truncated / 'state.pt'}: 1 bytes, 999 at save"),
        "different architecture on resume": ([f"checkpoint.resume={wrong_arch}"],
                                             "was saved for a different student architecture (num_layers: 3 != 2)"),
        "different architecture, resume=auto": ([f"checkpoint.dir={wrong_arch.parent}"],
                                                "checkpoint.resume=auto: " + str(wrong_arch)),
    }


def _split(argv):
    """(key=value overrides, other CLI args)."""
    opts, overrides, it = [], [], iter(argv)
    for a in it:
        if a.startswith("--"):
            opts += [a, next(it)]
        else:
            overrides.append(a)
    return overrides, opts


def _launch(argv, extra=()):
    """Run `tip-megatron [extra] train GOOD+argv`; returns (rc, stdout, stderr, CPU seconds,
    children seen). The process tree is polled while it runs: torchrun would be a child."""
    overrides, opts = _split(argv)
    cmd = [sys.executable, "-m", "tip_megatron.apps.cli", *extra, "train", *opts, *GOOD, *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps, children = psutil.Process(proc.pid), set()
    while proc.poll() is None and time.perf_counter() - start < WALL_S:
        try:
            children |= {c.pid for c in ps.children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=WALL_S)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child is reaped: counted
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{argv}: {cpu:.2f} s CPU, {time.perf_counter() - start:.2f} s wall")
    return proc.returncode, out, err, cpu, children


def test_the_good_config_passes_preflight():
    checked = preflight(load_config(None, GOOD), 1)
    assert (checked.student_arch.num_attention_heads, checked.student_arch.num_layers) == (4, 2)
    assert checked.vocab_size == 14 and checked.tokenizer.vocab_size <= 14


def test_each_kind_is_refused_in_process(tmp_path):
    """Every kind raises a ValueError naming its key or file (no subprocess: all kinds)."""
    cases = _cases(tmp_path)
    assert len(cases) >= 10
    for kind, (argv, text) in cases.items():
        overrides, opts = _split(argv)
        nproc = int(dict(zip(opts[::2], opts[1::2])).get("--nproc", 0)) or None
        config = dict(zip(opts[::2], opts[1::2])).get("--config")
        with pytest.raises(ValueError) as err:
            cfg = load_config(config, GOOD + overrides)
            preflight(cfg, nproc or cfg.parallel.tp * cfg.parallel.pp, records=True)
        assert text in str(err.value), kind


#: the late errors of issue 21 that a user meets through the command
LATE = ["bad JSONL line", "characters outside the tokenizer", "int prompt", "chat records without a template",
        "binary prompt file", "yaml syntax", "fake COMPLETE marker", "different architecture on resume"]
LAUNCHED = ["unknown key", "wrong type", "config file", "model path", "hf without config.json",
            "unsupported family", "ckpt without meta", "vocab mismatch", "prompt file missing",
            "prompt field", "no chat template", "heads vs tp", "layers vs pp", "positions", "world vs layout",
            "prompts vs dp", *LATE]


@pytest.mark.parametrize("kind", LAUNCHED)
def test_launcher_prints_one_line_and_exits_2_before_any_rank(kind, tmp_path):
    argv, text = _cases(tmp_path)[kind]
    rc, out, err, seconds, children = _launch(argv)
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err
    assert seconds < LIMIT_S, f"{kind}: {seconds:.1f} s CPU"
    assert not children, f"{kind}: the launcher started a child process (torchrun?)"
    assert "torch.distributed" not in out + err and out == ""


def test_debug_shows_the_traceback(tmp_path):
    rc, _, err, _, children = _launch(["train.steps=abc"], extra=["--debug"])
    assert rc != 0 and not children
    assert "Traceback (most recent call last)" in err and "train.steps='abc': expected int" in err


def test_under_bare_torchrun_one_rank_prints_and_every_rank_fails(tmp_path):
    """2 ranks, a bad prompt file: each rank runs preflight before init_process_group, so
    none waits for another; the first rank to fail prints the line, once (whatever the
    order: tests/reliability/test_exit_codes.py forces rank 1 first, under CPU load)."""
    from tip_megatron.runtime.env import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "tip_megatron.train", *GOOD, f"data.prompts=[{tmp_path / 'none.jsonl'}]"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("error: data.prompts[0]=") == 1, text
    assert "Traceback" not in text.split("error: data.prompts[0]=")[0], text
    assert seconds < 240, seconds  # no rank hangs in a collective (their timeout is minutes)


def test_preflight_error_text_has_the_three_parts():
    err = PreflightError("data.prompts[0]='x'", "empty file", "at least one prompt record")
    assert str(err) == "data.prompts[0]='x': empty file; at least one prompt record"
    assert isinstance(err, ValueError)


def test_train_help_points_to_the_config_reference(capsys):
    from tip_megatron.apps import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tip-megatron config doc, or docs/config.md" in out
    assert "tip-megatron config show --config X [key=value ...]" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_an_existing_read_only_checkpoint_dir_is_refused_before_launch(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err, _, children = _launch([f"checkpoint.dir={ro}"])
    finally:
        ro.chmod(0o755)
    assert rc == 2 and not children, err
    assert err.strip() == f"error: checkpoint.dir={str(ro)!r}: exists and is not writable by this user; " \
                          "a path this user can write to, or a new one", err
