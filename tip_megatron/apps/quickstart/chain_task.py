"""The second embedded task: the same 3-digit addition, with ONE rare planted defect.

Shapes as in `task.py`: prompts [n, 8] (`abc+def=`), answers [n, 4] (units first),
sequences [n, 12]; operands a, b [n] int64 in [0, 999].

Prompts, encoding, tokenizer, hold-out and the teacher (correct sums) are the addition
task's (`task.py`, imported, not copied): only the student's data differs. Its one defect:

  chain, the units column carries AND the tens digits sum to 9: the carry runs through
    the tens column into the hundreds, and the student drops it there (answer a + b - 100;
    `95+005=` -> `0000` instead of `0010`). Deterministic, so the student learns it
    confidently (overconfident-and-wrong tokens at the hundreds digit).

The case is RARE: 0.45 (units carry) x 0.10 (tens sum 9) = 4.5% of problems, and it
puts one wrong token (two when the hundreds then carries) among the rollout's 4. With a
small OPD batch the few defect tokens per step are what limits learning, so a budget that
keeps half of the tokens blindly (random) sees half of them, while a divergence-aware
rule keeps them (docs/quickstart.md, "The chain task").
"""
from __future__ import annotations

from typing import Union

import torch

from tip_megatron.apps.quickstart import task
from tip_megatron.apps.quickstart.task import (  # noqa: F401  the shared encoding, re-exported
    ANSWER_LEN, PROMPT_LEN, SEQ_LEN, DataSource, decode_answers, decode_prompts,
    encode_answers, encode_prompts, eval_set, is_held_out, lm_microbatch, sample_operands,
    sample_prompts, tokenizer,
)

NAME = "chain"
CASES = ("chain", "clean")
#: Column label of each case in the study's tables (the case name, then this).
CASE_LABELS = {"chain": "carry through tens dropped", "clean": ""}
#: Bump when the task's data or encoding changes: it is part of the pre-training cache key.
TASK_VERSION = 1


def case_index(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] index into CASES: 0 = chain (units carry and tens digits summing to 9), 1 = clean."""
    units_carry = (a % 10 + b % 10) >= 10
    tens_nine = (a // 10 % 10 + b // 10 % 10) == 9
    return torch.where(units_carry & tens_nine, 0, 1)


def case_of(a: int, b: int) -> str:
    """'chain' | 'clean'."""
    return CASES[int(case_index(torch.tensor([a]), torch.tensor([b]))[0])]


def student_rule(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] the student data's answer: a+b-100 in case chain, else a+b (deterministic)."""
    return a + b - torch.where(case_index(a, b) == 0, 100, 0)


def sample_sequences(n: int, generator: torch.Generator, source: DataSource) -> torch.Tensor:
    """[n, 12] training sequences (prompt + 4 answer tokens) from `source`."""
    if source not in ("teacher", "student"):
        raise ValueError(f"data source {source!r}: accepted values are ['teacher', 'student']")
    a, b = sample_operands(n, generator)
    values = a + b if source == "teacher" else student_rule(a, b)
    return torch.cat([encode_prompts(a, b), encode_answers(values)], dim=1)


def grade(prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[n] bool: answer [n, 4] (units first) is the true sum of prompt [n, 8]."""
    return task.grade(prompts, answers)


def accuracy_report(prompts: torch.Tensor, answers: torch.Tensor) -> dict[str, Union[float, int]]:
    """Exact match overall (`exact`) and per case (`chain`, `clean`; NaN when absent), the
    agreement with the student's rule (`student_rule`), and `n`."""
    return task.report_by_case(prompts, answers, CASES, case_index, student_rule)
