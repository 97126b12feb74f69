"""`tip-megatron plan` and train/memory_plan.py: parameter counts against the published
models, how each setting moves its term, the JSON, the preflight warning and the refusals
(one line, exit 2). Measured peaks: tests/distributed/test_plan_measured.py."""
import json
import logging
from pathlib import Path

import pytest

from tip_megatron.apps.cli import main
from tip_megatron.config import load_config
from tip_megatron.models.arch import ModelArch
from tip_megatron.runtime.gpu_memory import gpu_memory_gib
from tip_megatron.train.memory_plan import plan_memory
from tip_megatron.train.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ROOT / "examples" / "archs"
QWEN3 = ROOT / "examples" / "configs" / "qwen3_8b_to_4b.yaml"
PAIR = ["--student-arch", str(ARCHS / "qwen3-4b"), "--teacher-arch", str(ARCHS / "qwen3-8b")]

#: Parameter counts of the published checkpoints (the safetensors' totals on the HF hub).
PUBLISHED = {"qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360,
             "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-14b": 14_770_033_664,
             "llama-3.1-8b": 8_030_261_248, "llama-3.3-70b": 70_553_706_496}


def _params(plan, who="student"):
    terms = [t for s in plan.stages for t in s.terms if t.name == f"{who}.params"]
    return sum(t.mib for t in terms) * 2**20 / 2  # bf16: 2 bytes a parameter


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_the_published_model(name):
    """TP = PP = 1 with the model as its own teacher: no vocabulary padding (all six
    vocabularies are multiples of 128), so the count is exact."""
    arch = ModelArch.from_hf_config(ARCHS / name)
    cfg = load_config(str(QWEN3), ["parallel.tp=1"])
    plan = plan_memory(cfg, arch, arch, 1)
    assert _params(plan) == PUBLISHED[name]
    # Split over TP=2 x PP=2, the four ranks' shares add up to the same model (the norms are
    # replicated over TP, a tied table has its copy on the last stage).
    cut = plan_memory(load_config(str(QWEN3), ["parallel.tp=2", "parallel.pp=2"]), arch, arch, 4)
    replicated = arch.num_layers * (2 * arch.hidden_size + (2 * arch.kv_channels if arch.qk_norm else 0))
    replicated += arch.hidden_size
    padding = 2 * (arch.padded_vocab_size(2) - arch.vocab_size) * arch.hidden_size  # both tables
    tied_copy = arch.vocab_size * arch.hidden_size if arch.tie_word_embeddings else 0
    assert 2 * _params(cut) == PUBLISHED[name] + replicated + padding + tied_copy


def _plan(overrides=(), world=2, **kw):
    cfg = load_config(str(QWEN3), list(overrides))
    s = ModelArch.from_hf_config(ARCHS / "qwen3-4b")
    t = ModelArch.from_hf_config(ARCHS / "qwen3-8b")
    return plan_memory(cfg, s, t, world, **kw)


def _term(plan, name, stage=0):
    return next(t.mib for t in plan.stages[stage].terms if t.name == name)


def test_settings_move_their_terms():
    base = _plan()
    # The distributed optimizer shards Adam's state (and the fp32 main params) over DP.
    assert _term(_plan(world=8), "student.optimizer") == pytest.approx(_term(base, "student.optimizer") / 4)
    whole = _plan(["optim.use_distributed_optimizer=false"], world=8)
    assert _term(whole, "student.optimizer") == pytest.approx(_term(base, "student.optimizer"))
    # Recompute: none > selective > full, on the CPU's local spec (unfused attention).
    acts = [_term(_plan([f"model.recompute_granularity={r}"], device="cpu"), "student.activations")
            for r in ("null", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    # The KV cache follows the rollouts of a DP rank.
    assert _term(_plan(["rollout.n=8"]), "rollout.kv_cache") == pytest.approx(
        _term(base, "rollout.kv_cache") / 2)
    # The fused loss path is flat in rho once kept >= chunk (but for the [k, h] hidden
    # gradient); unfused follows the kept count.
    fused = [_term(_plan([f"selection.rho={r}"]), "loss.output_layer") for r in (0.5, 0.9)]
    assert fused[0] < fused[1] < 1.05 * fused[0]
    unfused = [_term(_plan(["loss.impl=unfused", f"selection.rho={r}"]), "loss.output_layer")
               for r in (0.5, 0.25)]
    assert unfused[0] == pytest.approx(2 * unfused[1], rel=0.01)


def test_pipeline_stages_hold_their_own_parts():
    plan = _plan(["parallel.pp=2"], world=4)
    first, last = plan.stages
    assert first.ranks == (0, 1) and last.ranks == (2, 3)
    names = lambda s: {t.name for t in s.terms}  # noqa: E731
    assert "loss.output_layer" in names(last) and "loss.output_layer" not in names(first)
    assert "teacher.hidden_states" in names(last) and "rollout.logits" not in names(first)
    # 1F1B: the first stage keeps pp micro-batches in flight, the last one.
    assert _term(plan, "student.activations", 0) == pytest.approx(2 * _term(plan, "student.activations", 1))


def test_cli_table_json_and_exit_code(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", str(QWEN3), *PAIR, "--world-size", "8", "--gpu-mem", "h200",
                 "--json", str(out)])
    data = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert [r["rank"] for r in data["ranks"]] == list(range(8))
    for stage in data["stages"]:
        phases = stage["phases_mib"]
        # total = resident + the largest phase + margin, every term listed once
        assert stage["total_mib"] == pytest.approx(phases["resident"] + phases[stage["peak_phase"]]
                                                   + phases["margin"], abs=0.2)
        # every term listed once, in its phase and the phases it spans
        assert sum(t["mib"] * (1 + len(t["spans"])) for t in stage["terms"]) == pytest.approx(
            sum(phases.values()), abs=0.5)
        assert f"{stage['total_mib']:,.1f} MiB" in text
    assert data["gpu_memory_gib"] == 139.8
    assert code == (0 if data["fits"] else 1)
    assert "dominant: " in text and "cut by" in text


@pytest.mark.parametrize("argv,message", [
    (["--gpu-mem", "h1000"], "error: --gpu-mem='h1000': not a memory size; accepted: a number"),
    (["--gpu-mem", "-3"], "error: --gpu-mem='-3': not a memory size"),
    (["parallel.tp=3"], "error: parallel (tp=3, pp=1, vpp=None): the student"),
    (["parallel.pp=5"], "num_layers=36 is not divisible by pp*vpp = 5"),
    (["--world-size", "3"], "error: world size 3 is not divisible by tp*pp = 2*1"),
    (["--world-size", "12"], "data.prompts_per_step=32 is not divisible by the data-parallel size 6"),
    (["parallel.gpu_memory_gib=lots"], "error: parallel.gpu_memory_gib='lots': not a memory size"),
    (["--student-arch", "/nonexistent"], "error: --student-arch='/nonexistent': no such file"),
])
def test_refusals_are_one_line(argv, message, capsys):
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    options = [a for a in argv if a not in overrides]
    pair = PAIR if "--student-arch" not in argv else ["--teacher-arch", PAIR[3]]
    assert main(["plan", str(QWEN3), *overrides, *pair, *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_gpu_memory_strings():
    assert gpu_memory_gib("H100") == 79.6 and gpu_memory_gib(80) == 80.0
    assert gpu_memory_gib("80GiB") == 80.0 and gpu_memory_gib("80GB") == pytest.approx(74.506, abs=1e-3)


BUILTINS = ["student.builtin=quickstart-student", "teacher.builtin=quickstart-teacher",
            "data.max_prompt_len=8", "rollout.max_new_tokens=4", "data.prompts_per_step=4"]


def test_preflight_warns_with_the_plan_when_over(caplog):
    with caplog.at_level(logging.WARNING, logger="tip_megatron.train.preflight"):
        preflight(load_config(None, BUILTINS + ["parallel.gpu_memory_gib=1000"]), 1, tokenizer=False)
        assert not caplog.records
        preflight(load_config(None, BUILTINS + ["parallel.gpu_memory_gib=0.0001"]), 1, tokenizer=False)
    (record,) = caplog.records
    assert "parallel.gpu_memory_gib=0.0001: the memory plan puts a rank at" in record.getMessage()
    assert "student.optimizer" in record.getMessage() and "EXCEEDS" in record.getMessage()
