"""What truncating the teacher costs: per-token divergence error and gradient cosine of
`teacher.signal: topk` (ops.topk_divergence) against the exact full-vocabulary loss
(ops.fused_linear_divergence), for k = 16, 64, 256 with and without the tail.

    python tools/bench_topk_signal.py --json topk.json            # both cases
    python tools/bench_topk_signal.py --cases random --tokens 64  # quicker

Cases:
  quickstart  real distributions: the embedded addition task's built-in models
              (`quickstart-teacher`, `quickstart-student`; read from the cache, pre-trained
              on first use), teacher-forced on `--sequences` sequences of the student's own
              rule (what its rollouts produce), the 4 answer positions of each; float64.
              Its vocabulary has 14 tokens: every k >= 14 is exact, so k = 2, 4, 8 are added.
  random      V = 151,936 (Qwen's vocabulary), h = 256, `--tokens` tokens, float32. Teacher
              logits z_t = h_t W_t^T, Gaussian over the vocabulary with a per-token standard
              deviation log-uniform in each `--scales` range: 1:8 spans near-uniform rows to
              moderately peaked ones, 8:16 rows dominated by a few tokens, as an LLM's usually
              are. The student shares the teacher's weight, its logits are the teacher's plus
              N(0, `--noise`^2) per entry (correlated, as under distillation). One case
              per range.
Per (case, divergence, k, tail), over the tokens, with D the exact value and D_k the top-k one:
  abs_err   mean |D_k - D|              rel_err  sum |D_k - D| / sum D
  cos_h     per-token cosine of dD_k/dh and dD/dh (the gradient the network receives;
            token weights 1, so row i of the hidden gradient is token i's): mean and min.
            The min is set by tokens where student and teacher agree (D ~ 1e-4): both
            gradients are near 0 there and their directions are noise
  cos_H     cosine of the whole [tokens, h] hidden-state gradients (the batch's step)
  cos_w     cosine of the output-weight gradients of the token sum
  mass      mean teacher probability inside the top k
Timings (ms per forward + backward, exact vs top-k) are printed with the load average:
on a shared machine they are noise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.ops import fused_linear_divergence  # noqa: E402 - after the path insert above
from tip_megatron.ops.divergences import Divergence  # noqa: E402
from tip_megatron.ops.topk_divergence import TopkSignal, topk_linear_divergence  # noqa: E402

QWEN_VOCAB = 151_936


def _cosine(a: torch.Tensor, b: torch.Tensor, dim=None) -> torch.Tensor:
    a, b = a.double(), b.double()
    if dim is None:
        a, b, dim = a.reshape(-1), b.reshape(-1), 0
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(1e-300)


def _loss_grads(fn, inputs, vocab_size: int, **kwargs):
    """(per-token value, hidden grad, weight grad, ms) of one forward + backward."""
    h, w, th, tw = inputs
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    start = time.perf_counter()
    loss, value = fn(h, w, th, tw, tp_group=None, vocab_size=vocab_size, **kwargs)
    loss.backward()
    return value.double(), h.grad, w.grad, (time.perf_counter() - start) * 1e3


def measure(case: str, inputs, vocab_size: int, ks, divergences, chunk: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        p_t = (inputs[2] @ inputs[3][:vocab_size].t()).double().softmax(dim=-1)
        entropy = -(p_t * p_t.clamp_min(1e-300).log()).sum(-1)
    for name in divergences:
        div = Divergence(name)
        exact, gh, gw, ms_exact = _loss_grads(fused_linear_divergence, inputs, vocab_size,
                                              chunk_size=chunk, divergence=div)
        for k in ks:
            mass = p_t.topk(min(k, vocab_size), dim=-1).values.sum(-1).mean().item()
            for tail in (True, False):
                value, th, tw, ms = _loss_grads(topk_linear_divergence, inputs, vocab_size,
                                                chunk_size=chunk, divergence=div,
                                                signal=TopkSignal(k, tail))
                err = (value - exact).abs()
                cos_h = _cosine(th, gh, dim=1)
                rows.append(dict(case=case, divergence=name, k=k, tail=tail, vocab=vocab_size,
                                 tokens=exact.numel(), exact_mean=exact.mean().item(),
                                 abs_err=err.mean().item(),
                                 rel_err=(err.sum() / exact.sum()).item(),
                                 cos_h_mean=cos_h.mean().item(), cos_h_min=cos_h.min().item(),
                                 cos_h_all=_cosine(th, gh).item(),
                                 cos_w=_cosine(tw, gw).item(), mass=mass,
                                 teacher_entropy_mean=entropy.mean().item(),
                                 ms_exact=ms_exact, ms_topk=ms))
    return rows


def random_inputs(tokens: int, vocab: int, hidden: int, seed: int, low: float, high: float,
                  noise: float):
    """(student hidden, student weight, teacher hidden, teacher weight); per-token logit
    scale log-uniform in [low, high]; student logits = teacher logits + N(0, noise^2) per
    entry (one weight: h_s = h_t + noise e / sqrt(h), e ~ N(0, I))."""
    g = torch.Generator().manual_seed(seed)
    ratio = torch.log(torch.tensor(high / low))
    scale = low * torch.exp(torch.rand(tokens, 1, generator=g) * ratio)
    th = torch.randn(tokens, hidden, generator=g) / hidden ** 0.5 * scale
    tw = torch.randn(vocab, hidden, generator=g)
    sh = th + noise * torch.randn(tokens, hidden, generator=g) / hidden ** 0.5
    return sh, tw.clone(), th, tw


def _final_hidden(tp_group, *, hidden_states, **_):
    return hidden_states


def _quickstart_rank(sequences: int, seed: int, ks, divergences) -> list[dict]:
    """Rank body (one forked rank: megatron's groups): both built-ins' final hidden states
    at the answer positions, then `measure` in float64."""
    # heavy and layer-crossing (apps > ops): the benchmark's own process only
    from tip_megatron.apps.quickstart import task
    from tip_megatron.checkpoint.sources import builtin_model
    from tip_megatron.distill.step import output_weight
    from tip_megatron.models import build_model
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.runtime import parallel

    groups = parallel.initialize(parallel.ParallelLayout(), seed=0)
    generator = torch.Generator().manual_seed(seed)
    batch = task.lm_microbatch(task.sample_sequences(sequences, generator, "student"))
    out = []
    for name in ("quickstart-student", "quickstart-teacher"):
        model = builtin_model(name)
        chunks = build_model(model.arch, groups, frozen=True)
        load_full_state_dict(chunks, model.full_state(groups), groups, model.arch)
        with torch.no_grad():
            hidden = chunks[0](batch["input_ids"], batch["position_ids"], None,
                               output_processor=partial(_final_hidden, groups.tp_group))
        answer = hidden.transpose(0, 1)[:, task.PROMPT_LEN - 1:].reshape(-1, hidden.shape[-1])
        out += [answer.double(), output_weight(chunks).double()]
        vocab = model.arch.vocab_size
    return measure("quickstart", out, vocab, ks, divergences, chunk=256)


def _table(rows: list[dict]) -> str:
    head = ("| case | V | teacher entropy | divergence | k | tail | teacher mass in top-k | exact D (mean) "
            "| mean abs err | rel err | cos dh mean | cos dh min | cos dH | cos dW |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['case']} | {r['vocab']:,} | {r['teacher_entropy_mean']:.2f} | {r['divergence']} | "
                     f"{r['k']} | "
                     f"{'yes' if r['tail'] else 'no'} | {r['mass']:.4f} | {r['exact_mean']:.4g} | "
                     f"{r['abs_err']:.3g} | {r['rel_err']:.3g} | {r['cos_h_mean']:.5f} | "
                     f"{r['cos_h_min']:.4f} | {r['cos_h_all']:.5f} | {r['cos_w']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="quickstart,random", help="comma list of quickstart, random")
    p.add_argument("--divergences", default="reverse_kl,forward_kl")
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--tokens", type=int, default=256, help="random case: tokens (default 256)")
    p.add_argument("--hidden", type=int, default=256, help="random case: hidden size (default 256)")
    p.add_argument("--sequences", type=int, default=256, help="quickstart case: sequences (default 256)")
    p.add_argument("--scales", default="1:8,8:16",
                   help="random case: per-token logit scale ranges low:high, one case each")
    p.add_argument("--noise", type=float, default=1.0,
                   help="random case: std of the student's logit noise around the teacher's")
    p.add_argument("--chunk", type=int, default=32, help="random case: tokens per chunk (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    cases, ks = args.cases.split(","), [int(k) for k in args.ks.split(",")]
    divergences = args.divergences.split(",")
    rows = []
    if "quickstart" in cases:
        from tip_megatron.runtime.processes import run_forked  # megatron's groups in a child

        small = sorted(set([2, 4, 8] + ks))
        rows += run_forked(_quickstart_rank, 1, args=(args.sequences, args.seed, small, divergences),
                           timeout_s=3600)[0]
    if "random" in cases:
        for scales in args.scales.split(","):
            low, high = (float(x) for x in scales.split(":"))
            inputs = random_inputs(args.tokens, QWEN_VOCAB, args.hidden, args.seed, low, high, args.noise)
            rows += measure(f"random {scales}", inputs, QWEN_VOCAB, ks, divergences, args.chunk)
    print(_table(rows))
    load = os.getloadavg()
    print(f"\nms per forward+backward (load average {load[0]:.2f}; noise under load):")
    for r in rows:
        print(f"  {r['case']:10s} {r['divergence']:10s} k={r['k']:<4d} tail={r['tail']!s:5s} "
              f"exact {r['ms_exact']:8.1f}  top-k {r['ms_topk']:8.1f}")
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    machine=platform.platform(), processor=platform.processor(),
                    cpus=os.cpu_count(), load_average=load, torch=torch.__version__, args=vars(args))
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
