"""The engine at a real shape (issue 26): Qwen3-1.7B -> Qwen3-0.6B shapes (random weights,
V = 151,936) through the whole CLI path at TP = 2, wall time and peak memory per process of
every stage.

    python tools/real_shape_run.py --root /tmp/realshape --json runs/real_shape.json

Stages (tip_megatron/testing/realshape.py `real_shape_stages`, the slow-tier test runs the
same): random HF checkpoints (sharded safetensors + index) -> `convert hf-to-mcore --tp 2`
(both) -> `train` 1 OPD step and save -> `train` resumed, step 2, save -> `generate --tp 2`
-> `eval --samples` -> `convert mcore-to-hf` -> transformers' logits of the export against
the engine's (TP = 2, fp32) -> the memory plan against one more step's measured rise
(`plan_check`). Prints a table, writes JSON with `uptime` and `free` before
and after (docs/plan.md "The real-shape pair").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tip_megatron.testing.realshape import (
    Layout, format_rows, logits_stage, plan_stage, real_shape_stages, run_stage, write_json, write_prompts,
)


def _machine() -> dict:
    return dict(uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                free_g=subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="work folder (~12 GB of checkpoints are written)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--log", help="the stages' output goes here (default: this terminal)")
    p.add_argument("--max-total-gib", type=float, default=19.0,
                   help="kill a stage whose processes hold more than this at once (default 19; 0: no bound)")
    p.add_argument("--skip", nargs="*", default=[], help="stage names to skip (already done in --root)")
    args = p.parse_args()
    before = _machine()
    write_prompts(args.root)
    log = open(args.log, "a") if args.log else None
    rows = []
    stages = real_shape_stages(args.root) + [("logits export vs engine", logits_stage(args.root)),
                                             ("plan check (1 step, no save)", plan_stage(args.root))]
    for name, argv in stages:
        if name in args.skip:
            continue
        rows.append(run_stage(name, argv, log=log, max_total_mib=args.max_total_gib * 1024))
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        if rows[-1]["rc"] != 0:
            break
    after = _machine()
    print(format_rows(rows))
    print(f"before: {before['uptime']}\nafter:  {after['uptime']}")
    lay = Layout(args.root)
    for name in ("logits.json", "plan_check.json"):
        if (lay.root / name).is_file():
            print(f"{name}: {(lay.root / name).read_text().strip()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(rows, args.json, before=before, after=after, python=sys.version.split()[0],
                   cpus=os.cpu_count())
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
