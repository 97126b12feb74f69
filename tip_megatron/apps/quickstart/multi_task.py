"""The two-domain embedded task (`--task multi`): 3-digit addition and 3-digit subtraction,
one tokenizer, two specialist teachers, one student with a planted defect in each domain.

Shapes: prompts [n, 8], answers [n, 4] (units first), sequences [n, 12]; operands a, b [n]
int64 in [0, 999]; op [n] int64, 0 = `add`, 1 = `sub` (index into DOMAINS).

    123+459=  ->  2850     add: a + b (582), units first, as the addition task (`task.py`)
    123=459=  ->  4660     sub: a - b + 1000 (664), units first

The tokenizer is the addition task's (`0123456789+=`, vocabulary 14), so all three models
share it (the multi-teacher run requires that). It has no `-`: the operator slot (position
3) holds `+` for addition and `=` for subtraction. The 1000 offset keeps every difference
in [1, 1999]: the thousands digit is 1 exactly when a >= b (no borrow out of the hundreds),
as the sum's thousands digit is the carry out of the hundreds.

Hold-out: the addition task's (by the operand hash): a held-out (a, b) is held out in both
domains; no training stage draws it, `eval_set` draws only them.

Data sources (`sample_sequences`), each prompt's domain drawn 50/50:
- `teacher_add` (teacher A, the addition specialist): correct sums; subtraction with every
  borrow ignored (digit-wise (a_i - b_i) mod 10, thousands 1): right only when no column
  borrows (0.55^3, about 17% of problems).
- `teacher_sub` (teacher B, the subtraction specialist): correct differences; addition with
  every carry ignored (digit-wise (a_i + b_i) mod 10, thousands 0): right only when no
  column carries (about 17%).
- `student`: one deterministic planted defect per domain, confident and wrong:
  add_carry, a units carry: it is dropped (a + b - 10), as the addition task's defect A;
  sub_borrow, a units borrow (a % 10 < b % 10): it is dropped (a - b + 1000 + 10).
  Each case is 45% of its domain's problems; the rest is right.

Each prompt record carries its domain under ROUTE_FIELD (`write_prompts`), the field the
multi-teacher run routes by (`data.route_field=domain`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

from tip_megatron.apps.quickstart import task
from tip_megatron.apps.quickstart.task import (  # noqa: F401  the shared encoding, re-exported
    ANSWER_LEN, PROMPT_LEN, SEQ_LEN, decode_answers, encode_answers, is_held_out,
    lm_microbatch, num_held_out, sample_operands, tokenizer,
)

NAME = "multi"
#: Bump when the task's data or encoding changes: it is part of the pre-training cache key.
TASK_VERSION = 1
DOMAINS = ("add", "sub")
#: The prompt record's field naming its domain (`data.route_field`).
ROUTE_FIELD = "domain"
#: The operator token of each domain (position 3 of the prompt), by DOMAINS index.
OPERATOR_IDS = (task.PLUS_ID, task.EQUALS_ID)
CASES = ("add_carry", "add_clean", "sub_borrow", "sub_clean")
#: Column label of each case in the study's tables (the case name, then this).
CASE_LABELS = {"add_carry": "units carry dropped", "add_clean": "",
               "sub_borrow": "units borrow dropped", "sub_clean": ""}
SOURCES = ("teacher_add", "teacher_sub", "student")


# ----------------------------------------------------------------------------- encoding
def encode_prompts(a: torch.Tensor, b: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """[n] operands and op -> [n, 8] ids of `abc+def=` (add) or `abc=def=` (sub)."""
    prompts = task.encode_prompts(a, b)
    prompts[:, 3] = torch.tensor(OPERATOR_IDS, device=a.device)[op]
    return prompts


def decode_problems(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, 8] prompt ids -> (a [n], b [n], op [n]); ValueError on a malformed prompt."""
    if prompts.dim() != 2 or prompts.shape[1] != PROMPT_LEN:
        raise ValueError(f"prompts must be [n, {PROMPT_LEN}] token ids, got {tuple(prompts.shape)}")
    ops = prompts[:, 3]
    is_sub = ops == OPERATOR_IDS[1]
    if not ((ops == OPERATOR_IDS[0]) | is_sub).all():
        raise ValueError("prompts must read `abc+def=` (add) or `abc=def=` (sub)")
    as_addition = prompts.clone()
    as_addition[:, 3] = task.PLUS_ID
    a, b = task.decode_prompts(as_addition)
    return a, b, is_sub.long()


def domain_index(prompts: torch.Tensor) -> torch.Tensor:
    """[n] index into DOMAINS of each prompt."""
    return decode_problems(prompts)[2]


# ----------------------------------------------------------------------------- the rules
def _column_digits(x: torch.Tensor) -> torch.Tensor:
    return task._digits(x, 3)  # [n, 3], units first


def true_value(a: torch.Tensor, b: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """[n] the right answer: a + b (add), a - b + 1000 (sub)."""
    return torch.where(op == 0, a + b, a - b + 1000)


def no_carry_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] addition with every carry ignored: digit-wise (a_i + b_i) mod 10, thousands 0."""
    digits = (_column_digits(a) + _column_digits(b)) % 10
    return (digits * torch.tensor([1, 10, 100])).sum(1)


def no_borrow_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] subtraction with every borrow ignored: digit-wise (a_i - b_i) mod 10, thousands 1."""
    digits = (_column_digits(a) - _column_digits(b)) % 10
    return 1000 + (digits * torch.tensor([1, 10, 100])).sum(1)


def case_index(a: torch.Tensor, b: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """[n] index into CASES: add_carry, add_clean, sub_borrow (a % 10 < b % 10), sub_clean."""
    carry = (a % 10 + b % 10) >= 10
    borrow = (a % 10) < (b % 10)
    return torch.where(op == 0, torch.where(carry, 0, 1), torch.where(borrow, 2, 3))


def student_rule(a: torch.Tensor, b: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """[n] the student data's answer: the units carry / borrow dropped, else right."""
    case = case_index(a, b, op)
    return true_value(a, b, op) + torch.where(case == 0, -10, torch.where(case == 2, 10, 0))


def source_rule(source: str, a: torch.Tensor, b: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """[n] the answer of data source `source` (one of SOURCES; all deterministic)."""
    if source == "teacher_add":
        return torch.where(op == 0, a + b, no_borrow_difference(a, b))
    if source == "teacher_sub":
        return torch.where(op == 1, a - b + 1000, no_carry_sum(a, b))
    if source == "student":
        return student_rule(a, b, op)
    raise ValueError(f"data source {source!r}: accepted values are {list(SOURCES)}")


# ----------------------------------------------------------------------------- sampling
def sample_problems(n: int, generator: torch.Generator):
    """n training problems (a, b, op): operands uniform over the addition task's training
    keys (never the hold-out), the domain 50/50."""
    a, b = sample_operands(n, generator)
    op = torch.randint(2, (n,), generator=generator)
    return a, b, op


def sample_sequences(n: int, generator: torch.Generator, source: str) -> torch.Tensor:
    """[n, 12] training sequences (prompt + 4 answer tokens) from `source`, both domains."""
    if source not in SOURCES:
        raise ValueError(f"data source {source!r}: accepted values are {list(SOURCES)}")
    a, b, op = sample_problems(n, generator)
    return torch.cat([encode_prompts(a, b, op), encode_answers(source_rule(source, a, b, op))], 1)


def sample_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 8] OPD prompts of both domains: training problems (never the hold-out)."""
    return encode_prompts(*sample_problems(n, generator))


def _held_problems(n: int, seed: int, domain: str | None):
    """n held-out problems: the addition task's hold-out order for `seed`; domains
    alternating add, sub, add... (domain None) or all of `domain`."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"domain {domain!r}: accepted: {list(DOMAINS)}")
    limit = num_held_out() * (2 if domain is None else 1)
    if not 1 <= n <= limit:
        raise ValueError(f"eval_set(n={n}): n must be in [1, {limit}] (hold-out size)")
    keys = task._split()[2]
    order = torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(seed))
    index = torch.arange(n)
    if domain is None:  # each held-out pair serves once per domain: pair k//2, domain k%2
        chosen, op = keys[order[index // 2]], index % 2
    else:
        chosen, op = keys[order[index]], torch.full((n,), DOMAINS.index(domain))
    return chosen // 1000, chosen % 1000, op


def eval_set(n: int, seed: int = 0, domain: str | None = None) -> torch.Tensor:
    """[n, 8] held-out prompts (same n, seed, domain -> same set): both domains alternating
    (domain None: n // 2 or so of each), or one domain's."""
    return encode_prompts(*_held_problems(n, seed, domain))


def write_prompts(path, n: int, seed: int = 0) -> int:
    """Write n training prompts of both domains as a prompt JSONL (`prompt`, `answer`,
    ROUTE_FIELD) for `data.prompts` of the multi-teacher run; returns n. A file that
    already holds these bytes is left alone, else it is replaced whole (a temp file, then
    a rename): every torchrun rank calls this before its first collective, and no rank
    reads a half-written file or one replaced under it."""
    a, b, op = sample_problems(n, torch.Generator().manual_seed(seed))
    tok = tokenizer()
    prompts, answers = encode_prompts(a, b, op), encode_answers(true_value(a, b, op))
    lines = [json.dumps({"prompt": tok.decode(prompts[k].tolist()),
                         "answer": tok.decode(answers[k].tolist()),
                         ROUTE_FIELD: DOMAINS[int(op[k])]}) for k in range(n)]
    text = "".join(line + "\n" for line in lines)
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return n
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return n


# ----------------------------------------------------------------------------- grading
def prompt_values(prompts: torch.Tensor, student: bool = False) -> torch.Tensor:
    """[n] the right answers of prompts [n, 8] (student: the student data's instead)."""
    a, b, op = decode_problems(prompts)
    return student_rule(a, b, op) if student else true_value(a, b, op)


def prompt_case_index(prompts: torch.Tensor) -> torch.Tensor:
    """[n] index into CASES of prompts [n, 8]."""
    return case_index(*decode_problems(prompts))


def grade(prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[n] bool: answer [n, 4] (units first) is the right answer of prompt [n, 8]."""
    return decode_answers(answers.to(prompts.device)) == prompt_values(prompts)


def accuracy_report(prompts: torch.Tensor, answers: torch.Tensor) -> dict[str, Union[float, int]]:
    """Exact match overall (`exact`), per domain (`add`, `sub`) and per case (CASES; NaN
    when absent), the agreement with the student's rule (`student_rule`), and `n`."""
    values = decode_answers(answers.to(prompts.device))
    correct = (values == prompt_values(prompts)).float()
    report: dict[str, Union[float, int]] = {"exact": correct.mean().item(), "n": int(len(values))}
    for key, names, index in (("domain", DOMAINS, domain_index(prompts)),
                              ("case", CASES, prompt_case_index(prompts))):
        for i, name in enumerate(names):
            mask = index == i
            report[name] = correct[mask].mean().item() if mask.any() else float("nan")
    report["student_rule"] = (values == prompt_values(prompts, student=True)).float().mean().item()
    return report
