"""The embedded tasks of `tip-megatron quickstart --task NAME` / `tip-megatron study --task NAME`.

    spec = get_task("chain")          # ValueError naming the accepted tasks otherwise
    spec.data                         # its data module: prompts, cases, rules (torch)
    spec.opd                          # its OPD recipe as trainer key=value overrides

Each task names its data module (imported on first use, so `tip-megatron --help` imports no
torch), its built-in teacher and student (registered in `builtin_models.py`, pre-trained by
`pretrain.py` with the data module's sequences and cached under their own keys), and its
default OPD recipe. Accuracy goes through `evaluation.evaluate(..., data=spec.data)` (the
eval path and the shared `quickstart-addition` grader: every task answers 4 digits, units
first). A task with several teachers (`multi`) lists them in `teachers` (name, built-in,
the route values it serves) and names the record field that routes a prompt
(`route_field`); `multi_teacher_overrides()` gives the trainer keys of its multi-teacher run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class EmbeddedTask:
    """One embedded task and its default OPD recipe."""

    name: str
    data_module: str
    """Module path of the data: CASES, CASE_LABELS, case_index, sample_prompts, eval_set..."""
    teacher: str
    """Built-in model name of the teacher (`teacher.builtin`)."""
    student: str
    """Built-in model name of the defective student (`student.builtin`)."""
    steps: int
    """Default OPD steps."""
    rule: str
    """Default TIP rule (`--rule`; rho 0.5 unless `--rho`)."""
    eval_size: int
    """Held-out problems of the quickstart's accuracies (teacher, before, after)."""
    opd: tuple[str, ...]
    """The OPD recipe: trainer overrides applied before the user's."""
    legend: str
    """One line under the quickstart's accuracies: what the planted cases are."""
    summary: str
    """What the task is, for --help and the set-up line."""
    teachers: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """Several teachers (the multi task): (name, built-in model, the route values it serves)
    each; empty for a one-teacher task. `teacher` is then the `--teacher` default."""
    route_field: str = ""
    """The prompt record's field routing each prompt to its teacher (`data.route_field`)."""

    @property
    def data(self) -> ModuleType:
        return importlib.import_module(self.data_module)

    def teacher_builtin(self, name: str | None) -> str:
        """The built-in model of teacher `name` (`--teacher`); None: `teacher`."""
        if name is None:
            return self.teacher
        names = {t[0]: t[1] for t in self.teachers}
        if name not in names:
            accepted = f"accepted: {', '.join(names)}" if names else "it has one teacher"
            raise ValueError(f"--teacher {name!r}: task {self.name!r}: {accepted}")
        return names[name]

    def multi_teacher_overrides(self) -> tuple[str, ...]:
        """The trainer overrides of the multi-teacher run (issue 23's `teachers:` list,
        routed by `data.route_field`); the prompts must carry the route field."""
        if not self.teachers:
            raise ValueError(f"task {self.name!r} has one teacher: no multi-teacher run")
        entries = ", ".join(f"{{name: {name}, builtin: {builtin}, serves: [{', '.join(serves)}]}}"
                            for name, builtin, serves in self.teachers)
        return (f"teachers=[{entries}]", f"data.route_field={self.route_field}")


#: Measured (docs/quickstart.md): lr 1e-3 -> 1e-4 over 120 steps ended at 81.7% with the
#: loss still falling; 2e-3 -> 2e-4 over 240 steps with beta2 0.98 repairs A and B, but
#: at 50% of the tokens only in some seeds: defect A plateaus near 68% for 60-150 steps,
#: and a run that leaves the plateau late ends below 99% (soft_or@0.5 98.5 +- 2.6 over 3
#: seeds, entropy_sample@0.5 91.0% in one seed of six). 480 steps (the same schedule,
#: stretched): every seed at 1 and 2 threads at 100% by step 240 (docs/study.md).
_ADDITION_OPD = ("data.prompts_per_step=256", "optim.lr=0.002", "optim.warmup_steps=10",
                 "optim.min_lr=0.0002", "optim.clip_grad=1.0", "optim.adam_beta2=0.98",
                 "train.micro_batch_size=64")

#: Tuned so that all-token OPD plateaus only near the end (docs/study.md, "chain task").
_CHAIN_OPD = ("data.prompts_per_step=16", "optim.lr=0.0001", "optim.warmup_steps=10",
              "optim.min_lr=0.00001", "optim.clip_grad=1.0", "optim.adam_beta2=0.98",
              "train.micro_batch_size=16")

#: The addition recipe at 240 steps (docs/study.md, "The multi task").
_MULTI_OPD = _ADDITION_OPD
#: The tools task (multi-turn: 8 model tokens per rollout, 6 observation tokens): the chain
#: task's recipe. docs/quickstart.md, "The tools task".
_TOOLS_OPD = _CHAIN_OPD

TASKS = {t.name: t for t in (
    EmbeddedTask(
        name="addition", data_module="tip_megatron.apps.quickstart.task",
        teacher="quickstart-teacher", student="quickstart-student", steps=480,
        rule="entropy_sample", eval_size=2000,
        opd=_ADDITION_OPD,
        legend="(A: units carry dropped, confident and wrong; B: thousands digit guessed)",
        summary="3-digit addition, student with two common defects (A 45%, B 27% of problems)"),
    EmbeddedTask(
        name="chain", data_module="tip_megatron.apps.quickstart.chain_task",
        teacher="quickstart-teacher", student="quickstart-chain-student", steps=120,
        rule="soft_or",
        # 6,000 held-out problems hold ~270 chain cases (2,000 would hold ~90)
        eval_size=6000, opd=_CHAIN_OPD,
        legend="(chain: a units carry through a tens sum of 9 dropped at the hundreds, confident and wrong)",
        summary="3-digit addition, student with one rare defect (chain, 4.5% of problems)"),
    EmbeddedTask(
        name="multi", data_module="tip_megatron.apps.quickstart.multi_task",
        teacher="quickstart-multi-teacher-add", student="quickstart-multi-student", steps=240,
        rule="soft_or", eval_size=2000, opd=_MULTI_OPD,
        legend="(add_carry / sub_borrow: the units carry / borrow dropped, confident and wrong)",
        summary="3-digit addition and subtraction, one specialist teacher per domain, student "
                "with a defect in each (45% of each domain's problems)",
        teachers=(("add", "quickstart-multi-teacher-add", ("add",)),
                  ("sub", "quickstart-multi-teacher-sub", ("sub",))),
        route_field="domain"),
    EmbeddedTask(
        name="tools", data_module="tip_megatron.apps.quickstart.tools_task",
        teacher="quickstart-tools-teacher", student="quickstart-tools-student", steps=120,
        rule="q3", eval_size=1000, opd=_TOOLS_OPD,
        legend="(b9: fetched register b ends in 9, the units carry dropped, confident and wrong)",
        summary="sum of two registers fetched by tool calls, student with one defect in using "
                "the results (b9, 9% of problems)"),
)}
DEFAULT_TASK = "addition"

#: The built-in providers, by name, as setup.py declares them (`register_builtins`).
PROVIDERS = {name: f"tip_megatron.apps.quickstart.builtin_models:{fn}" for name, fn in (
    ("quickstart-teacher", "teacher"), ("quickstart-student", "student"),
    ("quickstart-chain-student", "chain_student"), ("quickstart-tools-teacher", "tools_teacher"),
    ("quickstart-tools-student", "tools_student"),
    ("quickstart-multi-teacher-add", "multi_teacher_add"),
    ("quickstart-multi-teacher-sub", "multi_teacher_sub"), ("quickstart-multi-student", "multi_student"))}


def register_builtins() -> None:
    """Register the quickstart's providers in this process when its installed metadata
    lacks them (an editable install made before a name was added to setup.py); the same
    strings as the entry points, so registering is idempotent."""
    # lazy: the model-source registry imports the model layer; `--help` imports this module
    from tip_megatron.checkpoint.sources import builtin_names, register_builtin

    known = builtin_names()
    for name, provider in PROVIDERS.items():
        if name not in known:
            register_builtin(name, provider)


def get_task(name: str) -> EmbeddedTask:
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: accepted tasks: {', '.join(TASKS)}")
    return TASKS[name]
