"""The real-shape run (issue 26): a Qwen3-1.7B-shaped teacher and a Qwen3-0.6B-shaped student
(random weights, V = 151,936) through the whole CLI path at TP = 2, each stage timed and its
processes' peak memory recorded.

    stages = real_shape_stages(root)          # (name, argv) in the order they run
    rows = [run_stage(name, argv) for name, argv in stages]

Every stage is `python -m tip_megatron.apps.cli ARGV` in a child process, as a user types
it; a sampler thread reads each process of the stage's tree (launcher, torchrun, ranks)
every 50 ms: its high-water mark (VmHWM, which the kernel keeps, so no peak between two
reads is lost while the process lives) and its anonymous resident memory (RssAnon: the
memory the process really holds, not the page cache of memory-mapped safetensors it reads).
The stage's `sum_anon_mib` is the largest sum of RssAnon over the tree at one instant: what
the whole stage (both ranks) held on the machine at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

#: The published shapes (huggingface.co Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B config.json):
#: 28 layers, 16 query and 8 key/value heads of 128, tied embeddings, V = 151,936.
QWEN3_COMMON = dict(vocab_size=151936, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    attention_bias=False, hidden_act="silu")
QWEN3_0P6B = dict(QWEN3_COMMON, hidden_size=1024, intermediate_size=3072)
QWEN3_1P7B = dict(QWEN3_COMMON, hidden_size=2048, intermediate_size=6144)

CORPUS = ["the answer is 12", "so 12+34 = 46 and 7 * 6 = 42", "what is 1/2 of 84? it is 42",
          "the quick brown fox jumps over the lazy dog"] * 8
PROMPTS = [{"prompt": p, "answer": a} for p, a in
           [("what is 12+34?", "46"), ("the answer is", "12"), ("half of 84", "42"),
            ("the quick brown", "fox")]]
#: The run's sizes: 2 prompts x 2 rollouts of 128 new tokens per step (prompts are short).
MAX_NEW_TOKENS = 128
GENERATE_NEW_TOKENS = 32


def make_hf_model(out: str, shape: dict, seed: int, shard_size: str = "400MB") -> None:
    """Random bf16 Qwen3 of `shape` (transformers' own init), saved as sharded safetensors
    with model.safetensors.index.json and the test tokenizer (a 280-id BPE: fewer ids than
    the model's rows; preflight accepts it and sampling never draws an id >= 280 outside
    training)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tip_megatron.testing.assets import bpe_tokenizer

    torch.manual_seed(seed)
    config = Qwen3Config(**shape, dtype="bfloat16")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=shard_size)
    bpe_tokenizer(out, CORPUS)


class Layout:
    """Where everything of the run goes under one root folder."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.hf_student, self.hf_teacher = self.root / "hf_student", self.root / "hf_teacher"
        self.student, self.teacher = self.root / "student", self.root / "teacher"
        self.prompts, self.run = self.root / "prompts.jsonl", self.root / "run"
        self.samples, self.eval_json = self.root / "samples.jsonl", self.root / "eval.json"
        self.export, self.logits_json = self.root / "export", self.root / "logits.json"


def train_overrides(lay: Layout, save: bool = True, **extra) -> list[str]:
    """The run: bf16 (fp32 would need ~17.4 GiB for the two ranks before activations: the
    plan), Soft-OR at rho 0.5, checkpoints at every step (`save`)."""
    values = {
        "student.ckpt": lay.student, "teacher.ckpt": lay.teacher,
        "data.prompts": f"[{lay.prompts}]", "data.prompts_per_step": 2,
        "data.max_prompt_len": 16, "rollout.n": 2, "rollout.max_new_tokens": MAX_NEW_TOKENS,
        "selection.rule": "soft_or", "selection.rho": 0.5, "optim.lr": 1e-3,
        "optim.warmup_steps": 0, "train.steps": 2, "train.micro_batch_size": 1,
        "parallel.tp": 2, "model.dtype": "bf16", "loss.chunk_size": 256, "logging.log_every": 1,
    }
    if save:
        values.update({"checkpoint.dir": lay.run, "checkpoint.save_every": 1, "checkpoint.keep_last": 0})
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def plan_check(root) -> dict:
    """The memory plan against this run: each rank's resident-set rise over its level after
    set-up of the process group (`testing.memory`'s method, one step, no checkpoint) and
    the plan's CPU total of the same config. Writes and returns the rows."""
    from tip_megatron.config import load_config
    from tip_megatron.testing.distributed import run_distributed
    from tip_megatron.testing.memory import _measured_rank
    from tip_megatron.train.memory_plan import plan_memory
    from tip_megatron.train.preflight import check_models

    lay = Layout(root)
    overrides = train_overrides(lay, save=False, **{"train.steps": 1})
    cfg = load_config(None, overrides)
    s_arch, t_arch, _ = check_models(cfg)
    plan = {r: s.total_mib for s in plan_memory(cfg, s_arch, t_arch, 2, device="cpu").stages for r in s.ranks}
    measured = run_distributed(_measured_rank, 2, args=(overrides,), env={"TIP_MEGATRON_DEVICE": "cpu"},
                               timeout_s=3600)
    rows = [dict(rank=m["rank"], planned_mib=round(plan[m["rank"]], 1), measured_mib=round(m["rise_mib"], 1),
                 base_mib=round(m["base_mib"], 1), ratio=round(plan[m["rank"]] / m["rise_mib"], 3))
            for m in measured]
    (lay.root / "plan_check.json").write_text(json.dumps(rows) + "\n")
    print(json.dumps(rows))
    return rows


def real_shape_stages(root) -> list[tuple[str, list[str]]]:
    """(stage name, CLI argv) of the whole path, in order. The first two stages are the
    HF models (not CLI commands: `-c` programs of this module)."""
    lay = Layout(root)
    make = "from tip_megatron.testing.realshape import *; make_hf_model({!r}, {}, {})"
    return [
        ("make hf student", ["-c", make.format(str(lay.hf_student), "QWEN3_0P6B", 1)]),
        ("make hf teacher", ["-c", make.format(str(lay.hf_teacher), "QWEN3_1P7B", 2)]),
        ("convert student", _cli("convert", "hf-to-mcore", "--hf", lay.hf_student, "--out", lay.student, "--tp", 2)),
        ("convert teacher", _cli("convert", "hf-to-mcore", "--hf", lay.hf_teacher, "--out", lay.teacher, "--tp", 2)),
        ("train step 1 (save)", _cli("train", *train_overrides(lay, **{"train.exit_after_steps": 1}))),
        ("train step 2 (resume, save)", _cli("train", *train_overrides(lay))),
        ("generate", _cli("generate", "--ckpt", lay.run, "--prompts", lay.prompts,
                          "--out", lay.samples, "--tp", 2, "--max-new-tokens", GENERATE_NEW_TOKENS,
                          "--n", 2, "--seed", 7)),
        ("eval --samples", _cli("eval", "--samples", lay.samples, "--answers", lay.prompts,
                                "--grader", "exact", "--json", lay.eval_json, "--no-progress")),
        # float32: the local spec's norm weights are fp32 in a bf16 run; a bf16 export rounds
        # them (to 2^-8 near 1: the logits then differ by ~1e-2) and the logits would not be equal
        ("convert mcore-to-hf", _cli("convert", "mcore-to-hf", "--ckpt", lay.run, "--out", lay.export,
                                     "--max-shard-size", "400MB", "--dtype", "float32")),
    ]


def _cli(*argv) -> list[str]:
    return ["-m", "tip_megatron.apps.cli", *[str(a) for a in argv]]


def write_prompts(root) -> None:
    from tip_megatron.testing.assets import write_jsonl

    Path(root).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(root) / "prompts.jsonl", PROMPTS)


def plan_stage(root) -> list[str]:
    return ["-c", f"from tip_megatron.testing.realshape import plan_check; plan_check({str(root)!r})"]


def logits_stage(root) -> list[str]:
    """The last stage's argv: `compare_logits(root)` in a fresh interpreter."""
    return ["-c", f"from tip_megatron.testing.realshape import compare_logits; compare_logits({str(root)!r})"]


def _engine_logits(ckpt: str, input_ids):
    """Rank body (TP = 2): this rank's vocabulary shard of the engine's fp32 logits of the
    step's weights, [b, s, V_padded / tp]."""
    from functools import partial

    import torch

    from tip_megatron.checkpoint.sources import ModelSource, load_source_weights, source_arch
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.runtime import parallel, pipeline

    groups = parallel.initialize(parallel.ParallelLayout(tp=2))
    src = ModelSource(ckpt=ckpt)
    arch = source_arch(src)
    chunks = build_model(arch, groups, BuildOptions(params_dtype=torch.float32, init_weights=False))
    load_source_weights(chunks, groups, arch, src)
    with torch.no_grad():
        reports = pipeline.forward_backward(partial(_forward_step, input_ids), chunks, [input_ids], groups,
                                            seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0],
                                            forward_only=True)
    parallel.destroy()
    return reports[0]["logits"]


def _forward_step(input_ids, data_iterator, model):
    import torch

    ids = next(data_iterator)
    logits = model(ids, torch.arange(ids.shape[1])[None], None)
    return logits, lambda out: (out.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": out.float().clone()})


def compare_logits(root, seq: int = 16) -> dict:
    """transformers' fp32 logits of the export against the engine's fp32 logits of the
    trained step at TP = 2 (shards joined, padded rows cut), and against the untrained HF
    student (training must have moved them). Writes and returns the numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    from tip_megatron.checkpoint.model import model_files
    from tip_megatron.testing.distributed import run_distributed
    from tip_megatron.testing.hf_models import hf_logits

    lay = Layout(root)
    input_ids = torch.randint(0, QWEN3_0P6B["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    step = model_files(lay.run).path
    shards = run_distributed(_engine_logits, 2, args=(str(step), input_ids), env={"TIP_MEGATRON_DEVICE": "cpu"},
                             timeout_s=1800)
    engine = torch.cat(shards, dim=-1)[..., :QWEN3_0P6B["vocab_size"]]
    out = dict(step=str(step), seq=seq)
    for name, path in (("export", lay.export), ("initial", lay.hf_student)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[f"max_abs_diff_{name}"] = (hf_logits(model, input_ids) - engine).abs().max().item()
        del model
    out["max_abs_logit"] = engine.abs().max().item()
    lay.logits_json.write_text(json.dumps(out) + "\n")
    print(json.dumps(out))
    return out


# ------------------------------------------------------------------ measuring a stage
def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


def _role(proc, root_pid: int, root_cmd: list[str]) -> str:
    """rankN for torchrun workers (RANK in their environment; "rankN helper" for a process
    one of them started), forkN for processes forked from the command's process (its ranks
    and helpers: a forked child's environment cannot be read; numbered in pid order), else
    the program's role."""
    try:
        env = proc.environ()
        cmd = proc.cmdline()
    except Exception:  # it exited between the listing and this read
        return "gone"
    if proc.pid == root_pid:
        return "command"
    if "LOCAL_RANK" in env and "RANK" in env:  # a torchrun worker, or a process it started
        parent = proc.parent()
        parent_env = parent.environ() if parent is not None else {}
        return f"rank{env['RANK']}" + (" helper" if "LOCAL_RANK" in parent_env else "")
    if cmd == root_cmd:
        return "fork"
    joined = " ".join(cmd)
    return "torchrun" if "torch.distributed.run" in joined or "torchrun" in joined else "helper"


class TreeSampler(threading.Thread):
    """Samples the process tree under `pid` until stopped (module docstring)."""

    def __init__(self, pid: int, every_s: float = 0.05, max_total_mib: float = 0.0):
        super().__init__(daemon=True)
        import psutil  # a dependency of dist_checkpointing: always installed with the engine

        self.root = psutil.Process(pid)
        self.root_cmd = self.root.cmdline()
        self.every_s = every_s
        self.procs: dict[int, dict] = {}
        self.sum_anon_kib = 0
        self.max_total_kib = max_total_mib * 1024  # 0: no bound
        self.killed = False
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.every_s)

    def sample(self):
        try:
            tree = [self.root] + self.root.children(recursive=True)
        except Exception:  # the command exited
            return
        total = 0
        for proc in tree:
            kib = _status_kib(proc.pid)
            if not kib:
                continue
            rec = self.procs.get(proc.pid)
            if rec is None:
                rec = self.procs[proc.pid] = dict(pid=proc.pid, role="", hwm_kib=0, anon_kib=0)
            if not rec["role"].startswith("rank"):  # a worker is torchrun's copy until it execs
                rec["role"] = _role(proc, self.root.pid, self.root_cmd)
            rec["hwm_kib"] = max(rec["hwm_kib"], kib.get("VmHWM", 0))
            rec["anon_kib"] = max(rec["anon_kib"], kib.get("RssAnon", 0))
            total += kib.get("RssAnon", 0)
        self.sum_anon_kib = max(self.sum_anon_kib, total)
        if self.max_total_kib and total > self.max_total_kib and not self.killed:
            self.killed = True  # a shared machine: stop the stage before it starves the others
            for proc in reversed(tree):
                try:
                    proc.kill()
                except Exception:  # already gone
                    pass

    def stop(self):
        self._done.set()
        self.join()


def run_stage(name: str, argv: list[str], env: dict | None = None, log=None, max_total_mib: float = 0.0) -> dict:
    """Run one stage (`python ARGV`); wall time, exit code and each process's peaks (MiB).
    Its whole tree is killed when it holds more than `max_total_mib` at once (0: no bound)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env=env or dict(os.environ),
                            stdout=log, stderr=subprocess.STDOUT if log else None)
    sampler = TreeSampler(proc.pid, max_total_mib=max_total_mib)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    wall = time.perf_counter() - start
    procs = sorted(sampler.procs.values(), key=lambda r: r["pid"])
    forks = 0
    for r in procs:
        if r["role"] == "fork":
            r["role"] = f"fork{forks}"  # ranks (run_forked forks rank 0 first) and forked helpers
            forks += 1
    ranks = [dict(role=r["role"], peak_hwm_mib=round(r["hwm_kib"] / 1024, 1),
                  peak_anon_mib=round(r["anon_kib"] / 1024, 1)) for r in procs if r["hwm_kib"] > 100 * 1024]
    return dict(stage=name, rc=rc, wall_s=round(wall, 1), processes=ranks, killed_over_bound=sampler.killed,
                sum_anon_mib=round(sampler.sum_anon_kib / 1024, 1))


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'stage':<30} {'wall s':>7} {'rc':>3} {'all procs MiB':>13}  per process: peak RSS / peak anon MiB"]
    for r in rows:
        per = ", ".join(f"{p['role']} {p['peak_hwm_mib']:,.0f}/{p['peak_anon_mib']:,.0f}" for p in r["processes"])
        lines.append(f"{r['stage']:<30} {r['wall_s']:>7.1f} {r['rc']:>3} {r['sum_anon_mib']:>13,.0f}  {per}")
    return "\n".join(lines)


def write_json(rows: list[dict], path, **meta) -> None:
    Path(path).write_text(json.dumps(dict(meta, stages=rows), indent=1) + "\n")
