"""`tip-megatron plan CONFIG [key=value ...] [--gpu-mem GiB] [--json PATH]`: memory per rank
before launch (no model is built, no weight is read; docs/plan.md).

    tip-megatron plan examples/configs/qwen3_8b_to_4b.yaml --gpu-mem h100 --world-size 8 \\
        --student-arch examples/archs/qwen3-4b --teacher-arch examples/archs/qwen3-8b

The architectures come from the config's sources (config.json / arch.json only), or from
`--student-arch` / `--teacher-arch` (an HF config.json or its directory) when the weights
are not on this machine. Exit code 0 when every rank fits (or no memory was given), 1 when
a rank exceeds it, 2 on a bad input (one line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-rank memory plan of a run config (no GPU needed)")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=4")
    p.add_argument("--gpu-mem", default=None,
                   help="memory of one GPU: GiB (80), '80GiB', '80GB' or a name (h100, h200, "
                        "a100-40gb, ...); default parallel.gpu_memory_gib")
    p.add_argument("--world-size", type=int, default=0,
                   help="ranks of the job, the teacher's own included under teacher.placement="
                        "separate (default tp*pp + those: one student data-parallel replica)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="plan for GPUs (bf16 under model.dtype=auto, TE attention, CUDA margin) or "
                        "the CPU (fp32, local spec)")
    p.add_argument("--student-arch", help="HF config.json (or its directory) of the student")
    p.add_argument("--teacher-arch", help="HF config.json (or its directory) of the teacher")
    p.add_argument("--json", help="write the plan as JSON here (every term, total_mib per rank)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # Imported here: `tip-megatron --help` imports this module and must not load torch
    # (each of these reaches it through the config sections).
    from tip_megatron.config import load_config, validate_run  # torch, as above
    from tip_megatron.train.memory_plan import format_plan, plan_memory, single_teacher  # torch, as above
    from tip_megatron.train.preflight import check_models  # torch, as above

    cfg = single_teacher(load_config(args.config, args.overrides))
    for who in ("student", "teacher"):
        arch = getattr(args, f"{who}_arch")
        if arch:
            if not Path(arch).exists():
                raise ValueError(f"--{who}-arch={arch!r}: no such file or directory; accepted: an "
                                 "HF config.json or the directory holding it")
            # The weights' source only: the teacher keeps its layout and placement.
            source = dataclasses.replace(getattr(cfg, who), ckpt=None, hf=arch, builtin=None)
            cfg = dataclasses.replace(cfg, **{who: source})
    world = args.world_size or cfg.parallel.tp * cfg.parallel.pp + cfg.teacher.ranks(cfg.parallel)
    if world < 1:
        raise ValueError(f"--world-size={world}: must be >= 1")
    validate_run(cfg, world)
    s_arch, t_arch, _ = check_models(cfg)
    plan = plan_memory(cfg, s_arch, t_arch, world, device=args.device, gpu_memory=args.gpu_mem)
    print(format_plan(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    return 1 if plan.fits is False else 0
