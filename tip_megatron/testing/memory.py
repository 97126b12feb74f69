"""The memory plan against measured peaks of real short runs on the CPU (docs/plan.md).

    rows = measure_sizes(tmp_dir, SIZES)   # one forked run per size, each rank's peak
    print(format_rows(rows))

Each rank resets its resident-set high-water mark (`/proc/self/clear_refs`, Linux) once the
libraries are imported and the process group exists, runs the trainer, and reports how far
its resident set rose above the level at the reset: the memory the run itself added, which
the plan's CPU total (fp32, local spec, no CUDA margin) predicts. glibc keeps freed memory
resident, but a high-water mark is a maximum, so only fragmentation could inflate it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Size:
    """One measured configuration: the two models and the layout."""

    name: str
    vocab: int
    student_hidden: int
    teacher_hidden: int
    layers: int
    tp: int = 1
    pp: int = 1
    world: int = 1
    family: str = "llama"
    max_new_tokens: int = 16
    placement: str = "shared"
    """`separate`: the teacher on ranks of its own after the student's `world`."""
    teacher_tp: int = 0
    """The teacher's TP (0: the student's)."""

    @property
    def job_world(self) -> int:
        """Every rank of the run: the student's and the teacher's own."""
        return self.world + (self.teacher_tp or self.tp) * (self.placement == "separate")


#: The default test tier's three sizes (V 32k-64k so that the output layer matters).
SIZES = (
    Size("S tp1", vocab=32768, student_hidden=128, teacher_hidden=192, layers=2),
    Size("M tp2", vocab=65536, student_hidden=256, teacher_hidden=384, layers=2, tp=2, world=2,
         family="qwen3"),
    Size("L dp2", vocab=65536, student_hidden=384, teacher_hidden=512, layers=4, world=2),
)
#: The teacher on a rank of its own: student rank 0, teacher rank 1 (its hidden states cross
#: through gloo; the student keeps the step's, the teacher at most queue_depth in flight).
SEPARATE_SIZES = (
    Size("S sep", vocab=32768, student_hidden=128, teacher_hidden=192, layers=2, placement="separate"),
)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float:
    """Reset this process's VmHWM to its current RSS; the RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _vm_kib("VmHWM") / 1024


def return_freed_memory() -> None:
    """Make glibc hand every allocation of 1 MiB or more back to the system when it is
    freed (a fixed mmap threshold; by default it rises to 32 MiB after the first large
    free, and freed tensors below it stay resident). The resident set then follows the
    live tensors, as `torch.cuda.max_memory_allocated` does on a GPU."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def _make_models(root: str, size: Size) -> None:
    """Rank body: random student and teacher checkpoints of `size` (one rank)."""
    from tip_megatron.checkpoint.model import save_model_checkpoint
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.runtime import parallel
    from tip_megatron.testing.models import tiny_arch

    g = parallel.initialize(parallel.ParallelLayout(), seed=0)
    for who, hidden, seed in (("student", size.student_hidden, 1), ("teacher", size.teacher_hidden, 2)):
        arch = tiny_arch(size.family, vocab_size=size.vocab, hidden_size=hidden, num_layers=size.layers,
                         num_attention_heads=8, num_kv_heads=4, ffn_hidden_size=3 * hidden,
                         max_position_embeddings=128, head_dim=hidden // 8 if size.family == "qwen3" else None)
        chunks = build_model(arch, g)
        load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
        save_model_checkpoint(chunks, g, arch, f"{root}/{who}")
        del chunks


def run_overrides(root: Path, size: Size) -> list[str]:
    values = {
        "student.ckpt": root / "student", "teacher.ckpt": root / "teacher",
        "data.prompts": f"[{root / 'prompts.jsonl'}]", "data.tokenizer": "char",
        "data.prompts_per_step": 8, "data.max_prompt_len": 16, "rollout.n": 2,
        "rollout.max_new_tokens": size.max_new_tokens, "selection.rule": "soft_or",
        "selection.rho": 0.5, "train.steps": 2, "train.micro_batch_size": 4,
        "parallel.tp": size.tp, "parallel.pp": size.pp, "optim.lr": 1e-4,
        "teacher.placement": size.placement,
    }
    if size.teacher_tp:
        values["teacher.parallel.tp"] = size.teacher_tp
    return [f"{k}={v}" for k, v in values.items()]


def _measured_rank(overrides: list[str]) -> dict:
    """Rank body: the trainer's run; this rank's RSS rise over the level after set-up of the
    process group (the libraries the trainer uses are imported before the reset)."""
    from tip_megatron.config import load_config
    from tip_megatron.runtime import parallel
    from tip_megatron.runtime.env import rank_env  # with the rank body's other imports
    from tip_megatron.train import trainer
    from tip_megatron.train.optimizer import build_optimizer  # noqa: F401  (import before the reset)
    from tip_megatron.distill.teacher_config import teacher_split
    from tip_megatron.train.teacher import serve_teacher  # noqa: F401  (as above)

    return_freed_memory()
    cfg = load_config(None, overrides)
    split = teacher_split(cfg, rank_env().world_size)
    side = cfg.parallel
    if split is not None and split.role(rank_env().rank) == "teacher":
        side = cfg.teacher.parallel.resolve(cfg.parallel)
    parallel.initialize(side, seed=cfg.train.seed, split=split)  # the trainer's call finds it made
    base = reset_peak_rss()
    trainer.run(cfg)
    rank = rank_env().rank  # the job's rank (under a split, dist numbers each side from 0)
    return dict(rank=rank, base_mib=base, rise_mib=peak_rss_mib() - base)


def measure(root: Path, size: Size) -> list[dict]:
    """Each rank's measured rise (MiB) for `size` (models made under `root`)."""
    from tip_megatron.testing.assets import addition_prompts
    from tip_megatron.testing.distributed import run_distributed

    root.mkdir(parents=True, exist_ok=True)
    run_distributed(_make_models, 1, args=(str(root), size), env={"TIP_MEGATRON_DEVICE": "cpu"})
    addition_prompts(root / "prompts.jsonl", 64)
    # Spawned, not forked: a forked rank inherits its parent's heap and mapped pages (a
    # pytest process that ran a thousand tests before), which then never count as its rise,
    # and the measurement would depend on what ran before it.
    return run_distributed(_measured_rank, size.job_world, args=(run_overrides(root, size),),
                           env={"TIP_MEGATRON_DEVICE": "cpu"}, start_method="spawn")


def planned(root: Path, size: Size) -> dict[int, float]:
    """rank -> the plan's CPU total (MiB) of the same run."""
    from tip_megatron.config import load_config
    from tip_megatron.train.memory_plan import plan_memory
    from tip_megatron.train.preflight import check_models

    cfg = load_config(None, run_overrides(root, size))
    s_arch, t_arch, _ = check_models(cfg)
    plan = plan_memory(cfg, s_arch, t_arch, size.job_world, device="cpu")
    return {r: s.total_mib for s in plan.stages for r in s.ranks}


def measure_sizes(root: Path, sizes=SIZES) -> list[dict]:
    """One row per size and rank: planned vs measured MiB and their ratio."""
    rows = []
    for i, size in enumerate(sizes):
        where = Path(root) / f"size{i}"
        measured = measure(where, size)
        plan = planned(where, size)
        for m in measured:
            rows.append(dict(size=size.name, rank=m["rank"], planned_mib=round(plan[m["rank"]], 1),
                             measured_mib=round(m["rise_mib"], 1), base_mib=round(m["base_mib"], 1),
                             ratio=round(plan[m["rank"]] / m["rise_mib"], 3), **{"config": asdict(size)}))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'size':<8} {'rank':>4} {'planned MiB':>12} {'measured MiB':>13} {'plan/meas':>9}"]
    for r in rows:
        lines.append(f"{r['size']:<8} {r['rank']:>4} {r['planned_mib']:>12,.1f} {r['measured_mib']:>13,.1f} "
                     f"{r['ratio']:>9.3f}")
    return "\n".join(lines)


def write_json(rows: list[dict], path: Optional[str]) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
