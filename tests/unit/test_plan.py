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
    # Recompute: none = selective > full. Both specs' attention is fused (the local spec's
    # SdpaAttention keeps no [b, heads, s, s] probabilities): selective has nothing to drop.
    acts = [_term(_plan([f"model.recompute_granularity={r}"], device="cpu"), "student.activations")
            for r in ("null", "selective", "full")]
    assert acts[0] == acts[1] > acts[2]
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


# ------------------------------------------------------------------ teacher placements
# A tiny pair planned by hand. Student: h 64, 2 layers, 8 heads / 4 KV of 8, ffn 96; teacher:
# h 96, 4 layers, 8 heads / 4 KV of 12, ffn 160; V = 1000 padded to a multiple of
# 128 x lcm(tp_s 2, tp_t 1) = 1024. Sequence 8 + 8 = 16, 4 prompts x 2 rollouts, micro-batch 2.
TINY = ["data.prompts=[x.jsonl]", "data.max_prompt_len=8", "rollout.max_new_tokens=8",
        "data.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=2", "parallel.tp=2",
        "teacher.parallel.tp=1", "teacher.parallel.pp=2", "teacher.queue_depth=1"]
STUDENT_PARAMS = 2 * (16 * 8 * 64 // 2 + 8 * 8 * 64 // 2 + 3 * 96 * 64 // 2 + 2 * 64) + 512 * 64 + 64 + 512 * 64
TEACHER_LAYER = (8 + 8) * 12 * 96 + 8 * 12 * 96 + 3 * 160 * 96 + 2 * 96
TEACHER_STAGE = {0: 2 * TEACHER_LAYER + 1024 * 96, 1: 2 * TEACHER_LAYER + 96 + 1024 * 96}
HIDDEN = 2 * 16 * 96  # one micro-batch of teacher hidden states [s 16, b 2, h_t 96], elements
STEP_MBS = 2  # 4 rollouts of a DP rank / micro-batch 2
MIB_ = 2**20


def _tiny(placement, world, device):
    from tip_megatron.testing.models import tiny_arch

    s = tiny_arch("llama", vocab_size=1000, num_layers=2, ffn_hidden_size=96)
    t = tiny_arch("llama", vocab_size=1000, hidden_size=96, ffn_hidden_size=160)
    cfg = load_config(None, TINY + [f"teacher.placement={placement}"])
    return plan_memory(cfg, s, t, world, device=device)


def _terms(stage):
    return {t.name: t.mib * MIB_ for t in stage.terms}


def _by_hand_total(stage, resident, phases, margin):
    """resident + the largest phase + margin, from hand-computed bytes."""
    assert stage.peak_phase == max(phases, key=phases.get)
    return (resident + max(phases.values()) + margin) / MIB_


def test_separate_placement_by_hand_cpu():
    """Student TP 2 x DP 2 on ranks 0-3, teacher TP 1 x PP 2 on ranks 4-5 (fp32 on the CPU)."""
    plan = _tiny("separate", 6, "cpu")
    student, t0, t1 = plan.stages
    assert [(s.side, s.stage, s.ranks) for s in plan.stages] == [
        ("student", 0, (0, 1, 2, 3)), ("teacher", 0, (4,)), ("teacher", 1, (5,))]
    got = _terms(student)
    assert "teacher.params" not in got and "teacher.activations" not in got
    assert got["student.params"] == STUDENT_PARAMS * 4
    assert got["teacher.output_weight"] == 512 * 96 * 4  # [V_pad / tp_s, h_t] fp32
    assert got["teacher.hidden_states"] == STEP_MBS * HIDDEN * 4  # every micro-batch, kept
    for stage, ranks in ((t0, (4,)), (t1, (5,))):
        got = _terms(stage)
        assert not any(n.startswith(("student.", "rollout.", "loss.")) for n in got)
        assert got["teacher.params"] == TEACHER_STAGE[stage.stage] * 4
        # forward-only, one micro-batch of 32 tokens: 2h + the SwiGLU block (2h + 3 ffn) in
        # fp32 (fused attention: no scores)
        per_token = 4 * (2 * 96 + 2 * 96 + 3 * 160)
        assert got["teacher.activations"] == pytest.approx(32 * per_token)
    # Only the teacher's last stage sends: queue_depth 1 micro-batch waits besides the one scored.
    assert "teacher.hidden_in_flight" not in _terms(t0)
    assert _terms(t1)["teacher.hidden_in_flight"] == HIDDEN * 4
    # Its peak: reading its weights (a buffer as large as them) over the weights, plus the
    # teacher rank's smaller CPU margin (no optimizer, DDP buffers or prompt loader).
    got = _terms(t1)
    weights = TEACHER_STAGE[1] * 4
    assert got["load.read_buffers"] == weights
    assert t1.total_mib == pytest.approx(_by_hand_total(
        t1, weights, dict(load=weights, rollout=0, score=got["teacher.activations"] + HIDDEN * 4, train=0,
                          step=0), 20 * MIB_))
    # The student's rank reads the student's weights; its grads, optimizer state and the
    # teacher's output-weight rows come after the load.
    assert _terms(student)["load.read_buffers"] == STUDENT_PARAMS * 4
    assert student.phase_total_mib("load") * MIB_ == pytest.approx(2 * STUDENT_PARAMS * 4)
    # The student's own terms do not depend on where the teacher runs.
    one_grid = _tiny("shared", 4, "cpu").stages[0]
    for name, value in _terms(one_grid).items():
        if name.startswith(("student.", "rollout.", "loss.")):
            assert _terms(student)[name] == pytest.approx(value), name


def test_separate_placement_by_hand_cuda():
    """bf16; what crosses between the grids sits in host memory, outside the GPU total."""
    plan = _tiny("separate", 6, "cuda")
    student, _, t1 = plan.stages
    got = _terms(student)
    # every micro-batch ends on the device; at most queue_depth + 1 receives staged on the host
    assert got["teacher.hidden_states"] == STEP_MBS * HIDDEN * 2
    assert got["teacher.hidden_states.host"] == min(STEP_MBS, 1 + 1) * HIDDEN * 2
    # teacher TP rank 0 feeds student TP ranks 0 and 1: queue_depth x 2 copies after a trim,
    # 2 more before it
    assert _terms(t1)["teacher.hidden_in_flight.host"] == (1 * 2 + 2) * HIDDEN * 2
    for stage in plan.stages:
        host = sum(t.mib for t in stage.terms if t.phase == "host")
        assert host > 0 or stage.stage == 0 and stage.side == "teacher"
        device = stage.phase_mib("resident") + stage.phase_mib(stage.peak_phase) + stage.phase_mib("margin")
        assert stage.total_mib == pytest.approx(device)
    data = plan.to_dict()
    assert [(r["rank"], r["side"]) for r in data["ranks"]] == [(r, "student" if r < 4 else "teacher")
                                                              for r in range(6)]
    assert data["layout"]["teacher"]["ranks"] == [4, 5] and data["layout"]["student_ranks"] == [0, 3]


def test_shared_placement_with_its_own_teacher_layout_by_hand():
    """Teacher TP 1 x PP 2 x DP 2 on the student's TP 2 x DP 2 ranks: teacher stage 0 on ranks
    0-1, stage 1 on 2-3. Micro-batch g of student replica d comes from teacher rank
    (tp 0, dp g % 2, last stage) = 2 + g % 2: replica 0's ranks (0, 1) receive both of
    theirs from another rank, replica 1's (2, 3) one of theirs from themselves."""
    plan = _tiny("shared", 4, "cuda")
    assert [(s.side, s.stage, s.teacher_stage, s.ranks) for s in plan.stages] == [
        ("student", 0, 0, (0, 1)), ("student", 0, 1, (2, 3))]
    first, second = (_terms(s) for s in plan.stages)
    for got, t_stage in ((first, 0), (second, 1)):
        assert got["teacher.params"] == TEACHER_STAGE[t_stage] * 2
        assert got["teacher.output_weight"] == 512 * 96 * 2
    # every micro-batch ends on the device; under shared each remote one is staged at once
    assert first["teacher.hidden_states"] == STEP_MBS * HIDDEN * 2
    assert first["teacher.hidden_states.host"] == 2 * HIDDEN * 2
    assert second["teacher.hidden_states"] == STEP_MBS * HIDDEN * 2
    assert second["teacher.hidden_states.host"] == 1 * HIDDEN * 2
    assert "teacher.hidden_in_flight.host" not in first
    assert second["teacher.hidden_in_flight.host"] == min(1 * 2 + 2, 2 * 2) * HIDDEN * 2
    # On the CPU host and device are one memory: every micro-batch counts in the train phase.
    cpu = _terms(_tiny("shared", 4, "cpu").stages[1])
    assert cpu["teacher.hidden_states"] == STEP_MBS * HIDDEN * 4


def test_shared_teacher_wider_than_the_student_routes_by_rank():
    """Student TP 1 x DP 4, teacher TP 2 x DP 2 on the same 4 ranks. Student rank d's one
    micro-batch g = d comes from teacher rank (tp 0, dp g % 2) = 2 x (g % 2): rank 0 scores
    its own, ranks 1-3 receive theirs. Teacher TP rank 1 (ranks 1, 3) feeds no student TP
    rank (tp_s = 1), so only ranks 0 and 2 hold hidden states in flight."""
    from tip_megatron.testing.models import tiny_arch
    from tip_megatron.train.memory_plan import format_plan

    s = tiny_arch("llama", vocab_size=1000, num_layers=2, ffn_hidden_size=96)
    t = tiny_arch("llama", vocab_size=1000, hidden_size=96, ffn_hidden_size=160)
    cfg = load_config(None, [o for o in TINY if not o.startswith(("parallel.tp", "teacher.parallel"))]
                      + ["parallel.tp=1", "teacher.parallel.tp=2"])
    plan = plan_memory(cfg, s, t, 4, device="cuda")
    assert [st.ranks for st in plan.stages] == [(0,), (1, 3), (2,)]
    by_rank = {r: _terms(st) for st in plan.stages for r in st.ranks}
    # one micro-batch per replica (1 prompt x 2 rollouts, micro-batch 2): [s 16, b 2, h_t 96] bf16
    assert by_rank[0]["teacher.hidden_states"] == 2 * 16 * 96 * 2 and "teacher.hidden_states.host" not in by_rank[0]
    for r in (1, 2, 3):
        assert by_rank[r]["teacher.hidden_states.host"] == 2 * 16 * 96 * 2, r
    assert {r for r, got in by_rank.items() if "teacher.hidden_in_flight.host" in got} == {0, 2}
    assert "stage 0 (ranks 1,3)" in format_plan(plan)


SEPARATE = ["teacher.placement=separate"]


@pytest.mark.parametrize("argv,message", [
    (SEPARATE + ["teacher.parallel.tp=3", "--world-size", "5"],
     "error: teacher.parallel (tp=3, pp=1, vpp=None): the teacher"),
    (SEPARATE + ["teacher.parallel.pp=5", "--world-size", "12"], "num_layers=36 is not divisible by pp*vpp = 5"),
    (SEPARATE + ["teacher.parallel.tp=2", "--world-size", "2"],
     "error: teacher.placement=separate takes 2 ranks (teacher tp x pp x dp) of a world of 2"),
    (["teacher.parallel.dp=2"], "error: teacher.parallel.dp=2: only with teacher.placement=separate"),
    (["teacher.parallel.tp=4", "--world-size", "2"],
     "error: world size 2 is not divisible by tp*pp = 4*1 = 4 (teacher.parallel.tp x teacher.parallel.pp)"),
    (["teacher.placement=apart"], "error: teacher.placement='apart': accepted values are"),
])
def test_teacher_layout_refusals_are_one_line(argv, message, capsys):
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    options = [a for a in argv if a not in overrides]
    assert main(["plan", str(QWEN3), *overrides, *PAIR, *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_separate_counts_every_rank(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(QWEN3), *SEPARATE, "teacher.parallel.tp=4", *PAIR, "--json", str(out)]) == 0
    data, text = json.loads(out.read_text()), capsys.readouterr().out
    # default world: one student replica (tp 2) + the teacher's own tp 4 ranks
    assert data["world_size"] == 6 and [r["side"] for r in data["ranks"]] == ["student"] * 2 + ["teacher"] * 4
    assert "student: ranks 0-1 (tp 2 x pp 1 x dp 1)" in text
    assert "teacher (separate): ranks 2-5 (tp 4 x pp 1 x dp 1, its own grid)" in text
    assert "teacher stage 0 (ranks 2-3)" in text and "teacher stage 0 (ranks 4-5)" in text


def test_preflight_plans_the_teacher_ranks_of_its_own():
    from tip_megatron.train.preflight import warn_memory_plan

    cfg = load_config(None, BUILTINS + SEPARATE + ["parallel.gpu_memory_gib=1000"])
    s = t = ModelArch.from_hf_config(ARCHS / "qwen3-4b")
    plan = warn_memory_plan(cfg, 2, s, t)
    assert [(st.side, st.ranks) for st in plan.stages] == [("student", (0,)), ("teacher", (1,))]


@pytest.mark.parametrize("tp,t_tp", [(2, 1), (4, 8), (3, 2)])
def test_padded_vocabulary_is_the_one_the_models_are_built_with(tp, t_tp):
    from tip_megatron.train.memory_terms import padded_vocab
    from tip_megatron.train.setup import padded_vocab as built

    cfg = load_config(None, ["data.prompts=[x.jsonl]", f"parallel.tp={tp}", f"teacher.parallel.tp={t_tp}"])
    s, t = (ModelArch.from_hf_config(ARCHS / n) for n in ("qwen3-4b", "llama-3.1-8b"))
    assert padded_vocab(cfg, s, t) == built(cfg, s, t) and built(cfg, s, t) % (128 * max(tp, t_tp)) == 0
