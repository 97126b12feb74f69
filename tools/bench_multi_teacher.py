"""What routing costs: the multi task's two-teacher run (teachers `add` and `sub`, each
scoring its domain's rows) against the single-teacher run over the same rows (teacher
`add` scoring every row), side by side in one run, interleaved rounds, at 1 rank and at 2
(TP 2). Per configuration: the step time and its split (median over the steps after the
first of each round), and the peak resident memory of every rank (ru_maxrss, set-up
included, so the second teacher's weights show).

    python tools/bench_multi_teacher.py [--steps 4] [--rounds 2] [--json out.json]

The models are the quickstart's multi-task built-ins (pre-trained and cached on first use:
minutes). docs/teacher.md has the table (date, machine, load before and after).
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

from tip_megatron.apps.quickstart.tasks import get_task  # noqa: E402
from tip_megatron.testing.distributed import run_distributed  # noqa: E402

STAGES = ("rollout", "teacher", "student", "optimizer")


def overrides(prompts: Path, teachers: str, tp: int, steps: int) -> list[str]:
    spec = get_task("multi")
    data = spec.data
    single = teachers == "one"
    teacher_keys = ([f"teacher.builtin={spec.teacher_builtin('add')}"] if single
                    else list(spec.multi_teacher_overrides()))
    return [f"student.builtin={spec.student}", *teacher_keys, f"data.prompts=[{prompts}]",
            f"parallel.tp={tp}", f"data.max_prompt_len={data.PROMPT_LEN}",
            f"rollout.max_new_tokens={data.ANSWER_LEN}", "selection.rule=soft_or",
            "selection.rho=0.5", *spec.opd, f"train.steps={steps}", "logging.log_every=1"]


def _rank(args: list[str]) -> dict:
    from tip_megatron.apps.quickstart.tasks import register_builtins
    from tip_megatron.config import load_config
    from tip_megatron.train.trainer import run

    register_builtins()  # an editable install made before the multi task's built-ins
    history = run(load_config(None, args))
    return {"rank": int(os.environ["RANK"]), "history": history,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(prompts: Path, steps: int, rounds: int) -> list[dict]:
    configs = [(f"{name}, {'1 rank' if tp == 1 else 'TP 2'}", teachers, tp)
               for tp in (1, 2) for name, teachers in (("one teacher (add) on every row", "one"),
                                                       ("two teachers routed by domain", "two"))]
    got: dict = {name: {"steps": [], "rss": []} for name, _, _ in configs}
    for _ in range(rounds):
        for name, teachers, tp in configs:
            results = run_distributed(_rank, tp, args=(overrides(prompts, teachers, tp, steps),),
                                      timeout_s=3600)
            history = next(r["history"] for r in results if r["history"])
            got[name]["steps"] += history[1:] or history
            got[name]["rss"].append([round(r["maxrss_mib"]) for r in sorted(results, key=lambda r: r["rank"])])
    rows = []
    for name, _, tp in configs:
        steps_ = got[name]["steps"]
        rows.append(dict(config=name, ranks=tp, step_s=statistics.median(m["step_s"] for m in steps_),
                         **{f"{s}_s": statistics.median(m.get(f"time_{s}_s", 0.0) for m in steps_) for s in STAGES},
                         peak_rss_mib_per_rank=[max(r[i] for r in got[name]["rss"]) for i in range(tp)],
                         loss=[m["loss"] for m in steps_]))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| configuration | step s | rollout | teacher | student | optimizer | peak RSS MiB per rank |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['teacher_s']:.2f} | "
                     f"{r['student_s']:.2f} | {r['optimizer_s']:.2f} | "
                     f"{', '.join(map(str, r['peak_rss_mib_per_rank']))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        get_task("multi").data.write_prompts(prompts, 4096)
        rows = measure(prompts, args.steps, args.rounds)
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpus=os.cpu_count(),
               load_before=load_before, load_after=os.getloadavg(), rows=rows)
    print(f"{out['date']}, {out['cpus']} CPUs, load before {load_before[0]:.1f}, "
          f"after {out['load_after'][0]:.1f}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
