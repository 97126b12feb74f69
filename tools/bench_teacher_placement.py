"""Teacher placement, measured side by side in one run: the one grid, the teacher on its own
layout on the same ranks (`shared`), and the teacher on ranks of its own (`separate`), at 4
ranks on tiny random Llamas (gloo, CPU). Per configuration: the step's time split (median
over the steps after the first), the student's wait for teacher hidden states, the peak
resident memory of every rank (ru_maxrss: set-up included), and the hidden-state bytes a
student last-stage rank received per step. Then what shipping the teacher's hidden states
moves per step at a real shape, against teacher logits (full and top-64).

    python tools/bench_teacher_placement.py [--steps 5] [--json out.json]

docs/teacher.md has the table (date, machine, load before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.testing.assets import addition_prompts, model_checkpoint, tiny_run_overrides  # noqa: E402
from tip_megatron.testing.distributed import run_distributed  # noqa: E402

STUDENT = dict(hidden=128, layers=4, seed=1)
TEACHER = dict(hidden=256, layers=8, seed=2)
CONFIGS = {
    "one grid (student TP2 x DP2, teacher on it)": (4, {"parallel.tp": 2}),
    "shared (student TP2 x DP2, teacher TP4)": (4, {"parallel.tp": 2, "teacher.parallel.tp": 4}),
    "separate (student TP2 | teacher TP2, 2+2 ranks)": (4, {"parallel.tp": 2, "teacher.parallel.tp": 2,
                                                            "teacher.placement": "separate"}),
}
STAGES = ("rollout", "teacher", "student", "optimizer", "teacher_wait")


def _assets(root: Path) -> None:
    model_checkpoint(root / "student", **STUDENT)
    model_checkpoint(root / "teacher", **TEACHER)


def _rank(overrides: list[str]) -> dict:
    """Rank body: train, then this rank's peak RSS and (logging rank) its metrics."""
    from tip_megatron.config import load_config
    from tip_megatron.train.trainer import run

    history = run(load_config(None, overrides))
    return {"rank": int(os.environ["RANK"]), "history": history,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(root: Path, steps: int) -> list[dict]:
    rows = []
    for name, (world, extra) in CONFIGS.items():
        overrides = tiny_run_overrides(root, **{"train.steps": steps, "data.prompts_per_step": 16,
                                                "train.micro_batch_size": 2, **extra})
        start = time.perf_counter()
        results = run_distributed(_rank, world, args=(overrides,), timeout_s=1800)
        wall = time.perf_counter() - start
        history = next(r["history"] for r in results if r["history"])[1:] or \
            next(r["history"] for r in results if r["history"])
        split = {s: statistics.median(m.get(f"time_{s}_s", 0.0) for m in history) for s in STAGES}
        rows.append(dict(config=name, ranks=world, wall_s=wall,
                         step_s=statistics.median(m["step_s"] for m in history), **{f"{s}_s": v for s, v in split.items()},
                         hidden_mib_per_step=statistics.median(m.get("teacher_hidden_mib", 0.0) for m in history),
                         maxrss_mib_per_rank=[round(r["maxrss_mib"]) for r in sorted(results, key=lambda r: r["rank"])],
                         loss=[m["loss"] for m in history]))
    return rows


def bytes_per_token(vocab: int = 151_936, hidden: int = 8192, k: int = 64, value_bytes: int = 2) -> dict:
    """Bytes one response token moves from teacher to student (bf16 values, int32 ids)."""
    return {"hidden_states": hidden * value_bytes, "logits_full": vocab * value_bytes,
            f"logits_top{k}_with_tail": k * (4 + value_bytes) + value_bytes}


def table(rows: list[dict], per_token: dict, tokens: int) -> str:
    head = ("| configuration | step s | rollout | teacher | student | (teacher wait) | optimizer | "
            "hidden MiB/step | peak RSS MiB per rank |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['teacher_s']:.2f} | "
                     f"{r['student_s']:.2f} | {r['teacher_wait_s']:.2f} | {r['optimizer_s']:.2f} | "
                     f"{r['hidden_mib_per_step']:.2f} | {', '.join(map(str, r['maxrss_mib_per_rank']))} |")
    lines += ["", f"Per step of {tokens:,} tokens at V = 151,936, h_teacher = 8,192 (bf16):", "",
              "| what crosses | bytes per token | GiB per step | vs hidden states |", "|---|---|---|---|"]
    base = per_token["hidden_states"]
    for what, b in per_token.items():
        lines.append(f"| {what} | {b:,} | {b * tokens / 2**30:.1f} | {b / base:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_distributed(_assets, 1, args=(root,), env={"TIP_MEGATRON_DEVICE": "cpu"})
        addition_prompts(root / "prompts.jsonl", 64)
        rows = measure(root, args.steps)
    # A real step: 32 prompts x 16 rollouts x ~4,000 response tokens (the paper's math runs).
    tokens = 32 * 16 * 4000
    per_token = bytes_per_token()
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count(),
               load_before=load_before, load_after=os.getloadavg(), rows=rows,
               bytes_per_token=per_token, tokens_per_step=tokens)
    print(f"{out['date']}, {out['cpus']} CPUs, load before {load_before[0]:.1f}, "
          f"after {out['load_after'][0]:.1f}")
    print(table(rows, per_token, tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
