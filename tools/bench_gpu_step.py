"""GPU benchmark of one student training step at the paper's Qwen3-8B -> Qwen3-4B shape.

Shapes: a micro-batch of `rollouts` sequences of prompt + response tokens, N = b * s;
student hidden h = 2560 (36 layers, 32 query / 8 KV heads of 128, SwiGLU 9728, tied
embeddings, V = 151,936); teacher hidden states [s, b, 4096] and output weight [V, 4096].

    python tools/bench_gpu_step.py --json $OUT/bench_gpu_step.json --md $OUT/bench_gpu_step.md
    python tools/bench_gpu_step.py --quick ...     # fewer lengths and repeats
    python tools/bench_gpu_step.py --tiny          # tiny shapes, runs on CPU (tested)

One process, TP = PP = DP = 1, random weights, bf16 params (fp32 main params, grads and
Adam state in megatron's optimizer). The teacher model is NOT run: its final hidden states
are random [s, b, 4096] bf16 tensors and its output weight a random [V, 4096] matrix (the
student's step only ever sees those two). Sections:
  decode   tokens/s of `rollout.generate` at n = 16 samples per prompt (before the
           optimizer exists, so its memory is the model's)
  memory   peak memory of one step (zero grads, fwd + bwd, AdamW) per loss path
           (`fused` engine path, `reference` = bench_selection_memory's paper-style
           processor: [N, V] logits with grad for every token) x rule (all 100%,
           entropy_sample 50%, soft_or 50%, q3 10%): the analogue of the paper's
           72.0 -> 38.1 GB; at the longest response that fits (reference, all tokens)
  speed    student fwd + bwd tokens/s and MFU with the fused TIP loss at rho = 1, and the
           loss path's share of that time (vs the same step with a trivial loss)
MFU counts model FLOPs per token: 6 * (P_layers + V * h) for the matmuls of the layers and
the LM head in fwd + bwd, plus 6 * L * s * (heads * head_dim) for causal attention
(QK^T and AV, halved by the mask); MFU = FLOPs / time / --peak-tflops (H100/H200 SXM
dense bf16: 989). Figures are measured, never estimated; a row that does not fit says so.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_selection_memory import (  # noqa: E402
    Row, _forward_step, _peak_bytes, _profiled, make_reference_processor,
)
from tip_megatron.distill.spec import DistillSpec, LossConfig, MicrobatchContext  # noqa: E402
from tip_megatron.distill.processor import make_output_processor  # noqa: E402
from tip_megatron.tip import SelectionConfig  # noqa: E402

ROWS = [Row(mode, rule, rho) for mode in ("fused", "reference")
        for rule, rho in (("all", 1.0), ("entropy_sample", 0.5), ("soft_or", 0.5), ("q3", 0.1))]


@dataclass(frozen=True)
class StepConfig:
    vocab: int = 151936
    hidden: int = 2560
    layers: int = 36
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 9728
    teacher_hidden: int = 4096
    rollouts: int = 1
    """Sequences per micro-batch (one micro-batch per step)."""
    prompt: int = 512
    responses: tuple[int, ...] = (8192, 6144, 4096, 2048, 1024)
    """Response lengths tried, longest first; the first that fits is used for every row."""
    recompute: Optional[str] = "full"
    """Activation recompute of the layers (the local spec's attention is not fused)."""
    spec: str = "auto"
    chunk: int = 1024
    iters: int = 3
    decode_prompts: int = 2
    decode_prompt_len: int = 128
    decode_new_tokens: int = 128
    decode_n: int = 16
    peak_tflops: float = 989.0
    seed: int = 0


TINY = StepConfig(vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                  teacher_hidden=96, rollouts=2, prompt=16, responses=(48, 32), chunk=32,
                  iters=1, decode_prompts=1, decode_prompt_len=8, decode_new_tokens=8,
                  decode_n=16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def _try(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, fn()) or (False, None) when it ran out of memory; the cache is released only
    after the exception (whose traceback holds the step's tensors) is gone."""
    try:
        return True, fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False, None


def measure(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, Optional[float]]:
    """(fn(), peak MiB above the start, total peak MiB or None on CPU). CUDA: the caching
    allocator's peak; CPU: torch.profiler's allocation replay (bench_selection_memory)."""
    if device.type != "cuda":
        result, events = _profiled(fn)
        memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
        return result, _peak_bytes(memory) / 2**20, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return result, (peak - base) / 2**20, peak / 2**20


class StepBench:
    """The student (bf16 on GPU), its optimizer and the step's inputs."""

    def __init__(self, cfg: StepConfig) -> None:
        from tip_megatron.runtime import parallel
        from tip_megatron.runtime.device import current_device
        from tip_megatron.models import build_model
        from tip_megatron.models.arch import ModelArch
        from tip_megatron.models.build import BuildOptions

        self.cfg = cfg
        self.groups = parallel.initialize(parallel.ParallelLayout(), seed=cfg.seed)
        self.device = current_device()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        longest = cfg.prompt + max(cfg.responses)
        self.arch = ModelArch(family="qwen3", vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                              num_layers=cfg.layers, num_attention_heads=cfg.heads,
                              num_kv_heads=cfg.kv_heads, ffn_hidden_size=cfg.ffn,
                              head_dim=cfg.head_dim, max_position_embeddings=longest,
                              rope_theta=1e6, tie_word_embeddings=True, qk_norm=True)
        self.chunks = build_model(self.arch, self.groups, BuildOptions(
            spec=cfg.spec, params_dtype=self.dtype, seq_length=longest,
            recompute_granularity=cfg.recompute))
        self.padded_vocab = self.arch.padded_vocab_size(1)
        self.num_params = sum(p.numel() for c in self.chunks for p in c.parameters())
        self.ddp = self.optimizer = None
        self.step_index = 0

    def build_optimizer(self) -> None:
        from tip_megatron.train.optimizer import OptimConfig, build_optimizer, wrap_ddp

        self.ddp = wrap_ddp(self.chunks, self.groups, OptimConfig())
        self.optimizer, _ = build_optimizer(self.ddp, self.groups, OptimConfig(), total_steps=10**6)

    def inputs(self, response: int) -> tuple:
        from tip_megatron.distill.step import Microbatch

        cfg, dev = self.cfg, self.device
        gen = torch.Generator().manual_seed(cfg.seed + response)
        b, s = cfg.rollouts, cfg.prompt + response
        target = torch.zeros(b, s, dtype=torch.bool)
        target[:, cfg.prompt - 1: s - 1] = True
        mb = Microbatch(input_ids=torch.randint(0, cfg.vocab, (b, s), generator=gen).to(dev),
                        position_ids=torch.arange(s).expand(b, s).contiguous().to(dev),
                        target_mask=target.to(dev), rollout_ids=torch.arange(b).to(dev))
        t_hidden = torch.randn(s, b, cfg.teacher_hidden, generator=gen).to(dev, self.dtype)
        t_weight = torch.randn(self.padded_vocab, cfg.teacher_hidden, generator=gen)
        t_weight = (t_weight * 4.0 / cfg.teacher_hidden ** 0.5).to(dev, self.dtype)
        return mb, t_hidden, t_weight

    def processor(self, row: Row, inputs: tuple) -> tuple[Callable, MicrobatchContext]:
        mb, t_hidden, t_weight = inputs
        # One micro-batch is the whole batch here: the batch-scoped rules select over it.
        scope = "rollout" if row.rule.startswith("soft_or") else "microbatch"
        spec = DistillSpec(SelectionConfig(rule=row.rule, rho=row.rho, seed=self.cfg.seed, scope=scope),
                           LossConfig(impl="fused", chunk_size=self.cfg.chunk), self.cfg.vocab,
                           self.groups.tp_group, step=self.step_index)
        ctx = MicrobatchContext(teacher_hidden=t_hidden, teacher_weight=t_weight,
                                target_mask=mb.target_mask, rollout_ids=mb.rollout_ids)
        if row.mode == "reference":
            return make_reference_processor(spec, "kept"), ctx
        return make_output_processor(spec), ctx

    def fwd_bwd(self, row: Optional[Row], inputs: tuple) -> int:
        """Zero grads, then the schedule's fwd + bwd; row None = a trivial loss."""
        from tip_megatron.runtime import pipeline

        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        mb = inputs[0]
        if row is None:
            step, item, kept = _trivial_forward_step, mb, int(mb.target_mask.sum())
        else:
            processor, ctx = self.processor(row, inputs)
            step, item = partial(_forward_step, processor), (mb, ctx)
        (report,) = pipeline.forward_backward(step, self.ddp, [item], self.groups,
                                              seq_length=mb.input_ids.shape[1],
                                              micro_batch_size=mb.input_ids.shape[0])
        return kept if row is None else int(report["distill"][1])  # [loss_sum, num_kept]

    def train_step(self, row: Row, inputs: tuple) -> int:
        kept = self.fwd_bwd(row, inputs)
        self.optimizer.step()
        self.step_index += 1
        return kept


def _trivial_forward_step(data_iterator, model):
    """The same model step with a negligible loss: its time is the step minus the loss path."""
    mb = next(data_iterator)

    def processor(*, hidden_states, **_: Any):
        return hidden_states.float().square().sum() * 1e-9

    def loss(out):
        return out, torch.tensor(1, dtype=torch.int, device=out.device), {}

    return model(mb.input_ids, mb.position_ids, None, output_processor=processor), loss


def timed(device: torch.device, fn: Callable[[], Any], iters: int) -> float:
    """Median seconds of `iters` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_section(bench: StepBench) -> dict:
    from tip_megatron.rollout.generate import GenerationConfig, generate

    cfg = bench.cfg
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab, (cfg.decode_prompts, cfg.decode_prompt_len), generator=gen).tolist()
    config = GenerationConfig(max_new_tokens=cfg.decode_new_tokens, n=cfg.decode_n)
    run = lambda: generate(bench.chunks, bench.groups, bench.arch, prompts, config, seed=cfg.seed)  # noqa: E731
    seconds = timed(bench.device, run, 1)
    tokens = cfg.decode_prompts * cfg.decode_n * cfg.decode_new_tokens
    return {"rows": cfg.decode_prompts * cfg.decode_n, "n": cfg.decode_n,
            "prompt_len": cfg.decode_prompt_len, "new_tokens": cfg.decode_new_tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def choose_response(bench: StepBench) -> tuple[int, str]:
    """The longest response at which the most demanding row (reference, all) fits."""
    # The first optimizer step allocates Adam's state: do it before any fit is judged.
    bench.train_step(Row("fused", "all", 1.0), bench.inputs(min(bench.cfg.responses)))
    for mode in ("reference", "fused"):
        for response in bench.cfg.responses:
            if _try(lambda: bench.train_step(Row(mode, "all", 1.0), bench.inputs(response)))[0]:
                return response, mode
    raise RuntimeError(f"no response length of {bench.cfg.responses} fits, even fused")


def memory_section(bench: StepBench, response: int) -> list[dict]:
    inputs, out = bench.inputs(response), []
    for row in ROWS:
        entry = {"mode": row.mode, "rule": row.rule, "rho": row.rho}
        step = partial(bench.train_step, row, inputs)
        ok, measured = _try(lambda: (measure(bench.device, step), timed(bench.device, step, bench.cfg.iters)))
        if ok:
            (kept, above, total), seconds = measured
            entry.update(kept_tokens=kept, step_peak_above_resident_mib=round(above, 1),
                         step_peak_total_mib=None if total is None else round(total, 1),
                         step_ms=round(seconds * 1e3, 1))
        else:
            entry.update(note="out of memory")
        out.append(entry)
    return out


def model_flops_per_token(cfg: StepConfig, seq: int) -> float:
    h, layers = cfg.hidden, cfg.layers
    attn_width = cfg.heads * cfg.head_dim
    per_layer = h * attn_width * 2 + h * cfg.kv_heads * cfg.head_dim * 2 + 3 * h * cfg.ffn
    return 6 * (layers * per_layer + cfg.vocab * h) + 6 * layers * seq * attn_width


def speed_section(bench: StepBench, response: int) -> dict:
    cfg, inputs = bench.cfg, bench.inputs(response)
    tokens = cfg.rollouts * (cfg.prompt + response)
    full = timed(bench.device, partial(bench.fwd_bwd, Row("fused", "all", 1.0), inputs), cfg.iters)
    trivial = timed(bench.device, partial(bench.fwd_bwd, None, inputs), cfg.iters)
    flops = model_flops_per_token(cfg, cfg.prompt + response) * tokens
    return {"tokens": tokens, "fwd_bwd_s": round(full, 4),
            "tokens_per_s": round(tokens / full, 1),
            "model_tflops_per_s": float(f"{flops / full / 1e12:.4g}"),
            "mfu": float(f"{flops / full / (cfg.peak_tflops * 1e12):.4g}"),
            "trivial_loss_fwd_bwd_s": round(trivial, 4),
            "loss_path_share": round(max(0.0, 1 - trivial / full), 4)}


def markdown(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['device']} ({result['software']}); "
             f"student {result['num_params'] / 1e9:.2f} B params, response {result['response']} "
             f"+ prompt {result['config']['prompt']} tokens x {result['config']['rollouts']}.", "",
             "| loss path | rule | rho | kept | step peak total MiB | above resident MiB | step ms |",
             "|---|---|---|---|---|---|---|"]
    for r in result["memory"]:
        cells = [r.get(k, r.get("note", "-")) for k in
                 ("kept_tokens", "step_peak_total_mib", "step_peak_above_resident_mib", "step_ms")]
        lines.append(f"| {r['mode']} | {r['rule']} | {r['rho']} | " + " | ".join(map(str, cells)) + " |")
    s, d = result["speed"], result["decode"]
    lines += ["", "| student fwd+bwd tokens/s | model TFLOP/s | MFU | loss-path share | "
              "decode tokens/s (n=16) |", "|---|---|---|---|---|",
              f"| {s['tokens_per_s']} | {s['model_tflops_per_s']} | {s['mfu']:.1%} | "
              f"{s['loss_path_share']:.1%} | {d['tokens_per_s']} |"]
    return "\n".join(lines) + "\n"


def run(cfg: StepConfig, log: Callable[[str], None] = print) -> dict:
    bench = StepBench(cfg)
    log(f"student: {bench.num_params / 1e9:.3f} B params on {bench.device}, {bench.dtype}")
    decode = decode_section(bench)
    log(f"decode: {decode}")
    bench.build_optimizer()
    response, fit_mode = choose_response(bench)
    log(f"response length {response} (fits with the {fit_mode} loss path at all tokens)")
    memory = memory_section(bench, response)
    for row in memory:
        log(f"memory: {row}")
    speed = speed_section(bench, response)
    log(f"speed: {speed}")
    device = torch.cuda.get_device_name() if bench.device.type == "cuda" else "CPU"
    return {"date": datetime.date.today().isoformat(), "device": device,
            "software": f"torch {torch.__version__}, cuda {torch.version.cuda}",
            "config": asdict(cfg), "num_params": bench.num_params, "response": response,
            "fit_mode": fit_mode, "memory": memory, "speed": speed, "decode": decode,
            "teacher": "not run: random [s, b, teacher_hidden] hidden states and a random "
                       "[V, teacher_hidden] output weight"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU; the default suite runs it)")
    p.add_argument("--quick", action="store_true", help="responses 4096/2048, 1 repeat, 32 new tokens")
    p.add_argument("--responses", type=int, nargs="+", default=None)
    p.add_argument("--rollouts", type=int, default=None)
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StepConfig:
    cfg = TINY if args.tiny else StepConfig()
    if args.quick and not args.tiny:
        cfg = replace(cfg, responses=(4096, 2048), iters=1, decode_new_tokens=32)
    changes = {k: v for k, v in (("responses", tuple(args.responses or ()) or None),
                                 ("rollouts", args.rollouts), ("peak_tflops", args.peak_tflops))
               if v is not None}
    if args.recompute:
        changes["recompute"] = None if args.recompute == "none" else args.recompute
    return replace(cfg, **changes)


def main(argv: Optional[list[str]] = None) -> dict:
    from tip_megatron.runtime.device import default_backend, quiet_third_party_warnings

    quiet_third_party_warnings()
    args = parse_args(argv)
    if not args.tiny and not default_backend().is_cuda:
        raise SystemExit("bench_gpu_step: the Qwen3-4B shape needs a CUDA GPU; use --tiny on the CPU")
    result = run(config_from_args(args), log=lambda line: print(line, flush=True))
    table = markdown(result)
    print("\n" + table)
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.md, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return result


if __name__ == "__main__":
    main()
