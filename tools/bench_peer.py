"""Side by side with TRL: one on-policy distillation step of the engine and of TRL 1.16's
`DistillationTrainer` (reverse KL, HF `generate`), same models, prompts and optimizer.

    python tools/bench_peer.py --json runs/bench_peer.json          # both setups
    python tools/bench_peer.py --setups tiny --rounds 3             # the small one only

TRL is a `bench` extra (`pip install -e .[bench]`), never a runtime dependency. The tool
needs it importable by `--trl-python` (default: this interpreter); a venv that keeps this
environment's torch: `python -m venv --system-site-packages V && V/bin/pip install
trl==1.16.0` (check that pip keeps torch and transformers).

Setups (random-init HF Llama models, converted into the engine through its own HF
name tables: both systems start from the same weights):
  tiny   teacher ~5.0 M -> student ~1.4 M params, V 4,096, 32 rows x 128 tokens, 1 thread
  v32k   teacher h512 x 8L, student h256 x 4L, V 32,000, 32 rows x 256 tokens, 2 threads
  quick  a seconds-long smoke setup (the test's)
Every row: 16 random prompt tokens, then new tokens to the row length, temperature 1,
no stop id (uniform lengths; each system samples its own rollouts from the same prompts).
Optimizer: AdamW lr 1e-6, no weight decay, grad clip 1.0, fp32, one update per rollout
batch. TRL: all rows in one forward, `gradient_checkpointing` off (its default on costs a
recompute; `--trl-gradient-checkpointing` turns it on), bf16 off (CPU). Engine: rows in
micro-batches of `--micro-batch-size` (default: all rows in one, as TRL), rules `all`,
`soft_or@0.5`, `q3@0.1` with the selection defaults otherwise.

Each system runs in a process of its own (a worker, set up once); rounds interleave:
every round runs one step of each (system, rule) in an order that rotates each round,
after one untimed warm-up step each. Stages (seconds): generation, teacher (teacher
forward; TRL's is timed inside its loss), student (everything else of the forward +
backward: scoring pre-pass, selection, loss, backward), optimizer (clip + update). Memory:
peak RSS of the step (VmHWM, reset before each step) minus the RSS right after set-up
(models built, no step run: optimizer state a system allocates at its first step counts). JSON: per (setup, system) min and median of every stage,
step memory, load average before and after, and the engine/TRL step speedup per rule.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as py_platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = 16
RULES = {"all": ("all", 1.0), "soft_or@0.5": ("soft_or", 0.5), "q3@0.1": ("q3", 0.1)}


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=ffn,
                max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.05,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)


SETUPS = {
    "tiny": dict(teacher=_llama(4096, 256, 4, 4, 2, 704), student=_llama(4096, 128, 2, 4, 2, 352),
                 rows=32, seq=128, threads=1),
    "v32k": dict(teacher=_llama(32000, 512, 8, 8, 4, 1408), student=_llama(32000, 256, 4, 4, 2, 704),
                 rows=32, seq=256, threads=2),
    "quick": dict(teacher=_llama(512, 64, 2, 4, 2, 176), student=_llama(512, 32, 1, 2, 1, 88),
                  rows=4, seq=32, threads=1),
}


# ------------------------------------------------------------------ worker side
def _prompts(setup: dict) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, setup["student"]["vocab_size"], (setup["rows"], PROMPT), generator=gen).tolist()


def _hf_models(setup: dict):
    import torch
    import transformers

    models = []
    for seed, name in ((1, "teacher"), (2, "student")):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(transformers.LlamaConfig(**setup[name])))
    return models


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


class EngineWorker:
    def __init__(self, setup: dict, micro_batch_size: int):
        import torch
        from tip_megatron.checkpoint.hf.mapping import all_rules
        from tip_megatron.config import OptimConfig
        from tip_megatron.models import BuildOptions, build_model
        from tip_megatron.models.arch import ModelArch
        from tip_megatron.models.state import load_full_state_dict
        from tip_megatron.runtime import parallel
        from tip_megatron.runtime.env import free_port
        from tip_megatron.train.optimizer import build_optimizer, wrap_ddp

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        self.g = g = parallel.initialize(parallel.ParallelLayout(), seed=0)
        chunks = []
        for hf, frozen in zip(_hf_models(setup), (True, False)):
            arch = ModelArch.from_hf_config(hf.config.to_dict())
            sd = hf.state_dict()
            full = {r.mcore: r.to_full(arch, [sd[n] for n in r.hf]) for r in all_rules(arch)}
            model = build_model(arch, g, BuildOptions(init_weights=False), frozen=frozen)
            load_full_state_dict(model, full, g, arch)
            chunks.append((model, arch))
            del hf, sd, full
        (self.teacher, _), (student, self.arch) = chunks
        cfg = OptimConfig(lr=1e-6, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=False)
        self.ddp = wrap_ddp(student, g, cfg)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, g, cfg, total_steps=10_000)
        self.setup, self.mbs, self.prompts, self.step_index = setup, micro_batch_size, _prompts(setup), 0
        self.torch = torch

    def step(self, rule: str) -> dict:
        from tip_megatron.distill.spec import DistillSpec, LossConfig
        from tip_megatron.distill.prepass import global_preselection
        from tip_megatron.distill.step import (
            ScheduleShape, make_contexts, teacher_hidden_states, teacher_output_weight, train_pass,
        )
        from tip_megatron.rollout.generate import GenerationConfig, generate
        from tip_megatron.tip import SelectionConfig
        from tip_megatron.train.batches import update_microbatches

        name, rho = RULES[rule]
        sel = SelectionConfig(rule=name, rho=rho)
        spec = DistillSpec(sel, LossConfig(), self.arch.vocab_size, self.g.tp_group, step=self.step_index)
        times, t0 = {}, time.perf_counter()
        gen = GenerationConfig(max_new_tokens=self.setup["seq"] - PROMPT, temperature=1.0, stop_ids=(),
                               pad_id=0, keep_hidden=sel.prepass_from_generation)
        out = generate(self.ddp, self.g, self.arch, self.prompts, gen, seed=0, step=self.step_index)
        rows = out.token_ids.shape[0]
        mbs = update_microbatches(out.token_ids, out.response_mask, self.torch.arange(rows), 1, self.mbs)[0]
        shape = ScheduleShape(mbs[0].input_ids.shape[1], self.mbs)
        times["generation"], t0 = time.perf_counter() - t0, time.perf_counter()
        hidden = teacher_hidden_states(self.teacher, self.g, mbs, **shape._asdict())
        contexts = make_contexts(self.g, mbs, hidden, teacher_output_weight(self.teacher))
        times["teacher"], t0 = time.perf_counter() - t0, time.perf_counter()
        contexts = global_preselection(self.ddp, self.g, mbs, contexts, spec, shape, rollouts=out)
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = train_pass(self.ddp, self.g, mbs, contexts, spec, **shape._asdict())
        times["student"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.optimizer.step()
        self.scheduler.step(increment=1)
        times["optimizer"] = time.perf_counter() - t0
        self.step_index += 1
        kept = sum(int(r.metric_sums["distill"][1]) for r in results)
        return dict(times, tokens=int(out.response_mask.sum()), kept=kept)


class TrlWorker:
    def __init__(self, setup: dict, gradient_checkpointing: bool, steps: int):
        import datasets
        import tokenizers
        import torch
        import transformers
        from trl import DistillationConfig, DistillationTrainer

        vocab = setup["student"]["vocab_size"]
        # One word per id and an end-of-text token past the models' vocabulary: never
        # sampled, so every row runs to its length as in the engine (no stop id).
        words = {f"t{i}": i for i in range(vocab)} | {"<eos>": vocab}
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0")),
            pad_token="t0", eos_token="<eos>", padding_side="left")
        teacher, student = _hf_models(setup)
        self.prompts = _prompts(setup)

        class SamePrompts(DistillationTrainer):
            """The benchmark's token-id prompts as they are (the one change to TRL: no
            text round trip through a tokenizer)."""

            def _tokenize_prompts(self, prompts):
                return [list(p) for p in prompts], None, {}

        args = DistillationConfig(
            output_dir="/tmp/bench_peer_trl", per_device_train_batch_size=setup["rows"],
            max_completion_length=setup["seq"] - PROMPT, temperature=1.0, top_p=1.0, top_k=0, beta=1.0,
            learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
            gradient_checkpointing=gradient_checkpointing, report_to=[], logging_steps=10_000,
            save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, max_steps=steps,
            lr_scheduler_type="constant", disable_tqdm=True)
        self.trainer = SamePrompts(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                   train_dataset=datasets.Dataset.from_dict({"prompt": self.prompts}))
        self.teacher, self.clock = teacher, {}
        self.trainer.add_callback(self._callback())
        self._instrument()

    def _instrument(self) -> None:
        """Time generation and the teacher's forward from inside TRL's step."""
        tr, clock = self.trainer, self.clock
        generate, hidden = tr._generate, tr._get_last_hidden_state

        def timed_generate(*a, **k):
            t0 = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                clock["generation"] = clock.get("generation", 0.0) + time.perf_counter() - t0

        def timed_hidden(model, *a, **k):
            t0 = time.perf_counter()
            try:
                return hidden(model, *a, **k)
            finally:
                if model is self.teacher:
                    clock["teacher"] = clock.get("teacher", 0.0) + time.perf_counter() - t0

        tr._generate, tr._get_last_hidden_state = timed_generate, timed_hidden

    def _callback(self):
        """TRL's own training loop runs the steps; between two, this callback waits for the
        driver's next request and reports the step it timed (clip + update = optimizer)."""
        import transformers

        clock, marks, worker = self.clock, {}, self

        class Serve(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if not sys.stdin.readline().strip():
                    raise SystemExit(0)
                clock.clear()
                _reset_peak()
                marks["begin"] = time.perf_counter()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                marks["optimizer"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                times = dict(clock, optimizer=now - marks["optimizer"])
                times["student"] = marks["optimizer"] - marks["begin"] - times["generation"] - times["teacher"]
                _report(dict(times, tokens=None, kept=None), worker.rss_setup)

        return Serve()

    def serve(self) -> None:
        self.rss_setup = _rss_kib("VmRSS")
        self.trainer.train()


def _report(result: dict, rss_setup_kib: int) -> None:
    """One step's figures to the driver. Step memory: this step's peak RSS (VmHWM, reset
    before the step) minus the RSS right after set-up (models built, nothing run): what an
    allocator kept from earlier steps counts, as it stays resident."""
    result["step_mib"] = (_rss_kib("VmHWM") - rss_setup_kib) / 1024
    result["step"] = sum(result[s] for s in ("generation", "teacher", "student", "optimizer"))
    print("@@PEER " + json.dumps(result), flush=True)


def worker_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    setup = SETUPS[spec["setup"]]
    if spec["system"] == "trl":
        worker = TrlWorker(setup, spec["trl_gradient_checkpointing"], spec["steps"])
        print("@@PEER " + json.dumps({"ready": True}), flush=True)
        worker.serve()
        return
    worker = EngineWorker(setup, spec["micro_batch_size"] or setup["rows"])
    rss_setup = _rss_kib("VmRSS")
    print("@@PEER " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        _reset_peak()
        _report(worker.step(line.strip()), rss_setup)


# ------------------------------------------------------------------ driver side
class Worker:
    def __init__(self, python: str, spec: dict):
        cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.name = spec["system"]
        self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@PEER "):
                return json.loads(line[7:])
        raise RuntimeError(f"the {self.name} worker exited (rc {self.proc.wait()}); its errors are above")

    def step(self, rule: str) -> dict:
        self.proc.stdin.write(rule + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _summary(samples: list[dict]) -> dict:
    out = {}
    for key in ("generation", "teacher", "student", "optimizer", "step", "step_mib"):
        values = [s[key] for s in samples]
        out[key] = dict(min=min(values), median=statistics.median(values))
    return out


def run_setup(name: str, args) -> dict:
    setup = SETUPS[name]
    base = dict(setup=name, threads=setup["threads"], micro_batch_size=args.micro_batch_size,
                trl_gradient_checkpointing=args.trl_gradient_checkpointing)
    jobs = [("engine", rule) for rule in args.rules] + [("trl", "trl")]
    load_before = os.getloadavg()
    workers = {"engine": Worker(sys.executable, dict(base, system="engine")),
               "trl": Worker(args.trl_python, dict(base, system="trl", steps=args.rounds + 1))}
    samples: dict[str, list] = {label: [] for _, label in jobs}
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms every (system, rule) up
            shift = rnd % len(jobs)
            for system, label in jobs[shift:] + jobs[:shift]:
                result = workers[system].step(label if system == "engine" else "all")
                if rnd:
                    samples[label].append(result)
                print(f"  {name} round {rnd} {label:12s} step {result['step']:.2f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for w in workers.values():
            w.close()
    stats = {label: _summary(v) for label, v in samples.items()}
    trl = stats["trl"]["step"]["median"]
    speedup = {rule: trl / stats[rule]["step"]["median"] for rule in args.rules}
    params = {k: _count_params(setup[k]) for k in ("teacher", "student")}
    return dict(setup={k: v for k, v in setup.items()}, params=params, rounds=args.rounds,
                load_before=load_before, load_after=os.getloadavg(), stats=stats,
                speedup_vs_trl=speedup, samples=samples)


def _count_params(c: dict) -> int:
    h, ffn, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head = h // c["num_attention_heads"]
    attn = h * head * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    return 2 * v * h + layers * (attn + 3 * h * ffn + 2 * h) + h


def table(name: str, result: dict) -> str:
    lines = [f"setup {name}: teacher {result['params']['teacher'] / 1e6:.1f} M -> student "
             f"{result['params']['student'] / 1e6:.1f} M params, {result['setup']['rows']} x "
             f"{result['setup']['seq']} tokens, {result['setup']['threads']} thread(s), load "
             f"{result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}",
             "| system | step s (min / median) | generation | teacher | student | optimizer | "
             "step MiB | speedup vs TRL |", "|---|---|---|---|---|---|---|---|"]
    for label, s in result["stats"].items():
        cells = [f"{s[k]['min']:.2f} / {s[k]['median']:.2f}" for k in ("step", "generation", "teacher", "student",
                                                                      "optimizer")]
        sp = result["speedup_vs_trl"].get(label)
        system = "TRL" if label == "trl" else f"engine {label}"
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {s['step_mib']['median']:.0f} | "
                     + (f"{sp:.2f}x" if sp else "-") + " |")
    return "\n".join(lines)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", nargs="+", default=["tiny", "v32k"], choices=list(SETUPS))
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--micro-batch-size", type=int, default=0, help="engine rows per micro-batch (0: all rows)")
    p.add_argument("--trl-python", default=sys.executable, help="a python that imports trl 1.16")
    p.add_argument("--trl-gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: at least 1 timed round")
    if args.micro_batch_size < 0:
        p.error(f"--micro-batch-size {args.micro_batch_size}: 0 (all rows) or a positive row count")
    return args


def _check_trl(python: str) -> None:
    code = "import trl, sys; sys.exit(0 if trl.__version__.startswith('1.16') else 3)"
    rc = subprocess.run([python, "-c", code], capture_output=True).returncode
    if rc:
        sys.exit(f"bench_peer: {python} does not import trl 1.16 ({'other version' if rc == 3 else 'absent'}); "
                 "install the bench extra or pass --trl-python of a venv that has it")


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return {}
    _check_trl(args.trl_python)
    import torch

    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=py_platform.node(),
               cpu_count=os.cpu_count(), torch=torch.__version__, rules=args.rules,
               micro_batch_size=args.micro_batch_size,
               trl_gradient_checkpointing=args.trl_gradient_checkpointing, setups={})
    for name in args.setups:
        out["setups"][name] = run_setup(name, args)
        print(table(name, out["setups"][name]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
