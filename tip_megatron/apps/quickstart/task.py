"""The quickstart's embedded task: 3-digit addition, answer written least-significant first.

Shapes: prompts [n, 8] (`abc+def=`), answers [n, 4] (the sum's digits, units first),
sequences [n, 12] = prompt + answer; operands a, b [n] int64 in [0, 999].

    123+459=  ->  2850        (582 written units first, zero-padded to 4 digits)

Token ids are `CharTokenizer()`'s: digits 0-9 are ids 0-9, `+` is 10, `=` is 11. The
tokenizer also defines eos (12) and pad (13); the models are built with its vocabulary of
14 so the generation engine can be given its stop and pad ids, but neither id ever appears
in the data. There is no EOS in the sequences: every answer has exactly 4 tokens, and the
OPD rollouts generate exactly 4 new tokens (no stop ids).

About 2% of the 10^6 problems (a, b) are held out, chosen by a hash of the operands; no
training stage (teacher SFT, student SFT, OPD prompts) ever draws them, and `eval_set`
draws only them.

Two data sources:
- `teacher`: correct sums.
- `student`: two planted defects (see `case_of`):
  A, units column carries: the carry is dropped, answer a + b - 10 (deterministic, so the
    student learns it confidently: overconfident-and-wrong tokens);
  B, no units carry and a + b >= 1000: the thousands digit is written 0 with probability
    `DEFECT_B_ZERO_PROB`, else 1 (uncertain, and wrong under greedy decoding).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal, Union

import numpy as np
import torch

from tip_megatron.data.tokenizers import CharTokenizer

PROMPT_LEN = 8
ANSWER_LEN = 4
SEQ_LEN = PROMPT_LEN + ANSWER_LEN
NUM_PROBLEMS = 1000 * 1000
PLUS_ID, EQUALS_ID = 10, 11
#: Fraction of problems held out, in units of 1/10,000 of the operand hash.
HOLDOUT_PER_10K = 200
HOLDOUT_SALT = 0x5EED_AD0
DEFECT_B_ZERO_PROB = 0.7
CASES = ("A", "B", "clean")
#: Column label of each case in the study's tables (the case name, then this).
CASE_LABELS = {"A": "carry dropped", "B": "thousands guessed", "clean": ""}
NAME = "addition"
#: Bump when the task's data or encoding changes: it is part of the pre-training cache key.
TASK_VERSION = 1

DataSource = Literal["teacher", "student"]
_SOURCES = ("teacher", "student")


def tokenizer() -> CharTokenizer:
    """The task's tokenizer (`0123456789+=`, plus eos and pad)."""
    return CharTokenizer("0123456789+=")


# ----------------------------------------------------------------------------- hold-out
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 (numpy's unsigned arithmetic wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(held-out flag per problem key a*1000+b [10^6] bool, training keys, hold-out keys)."""
    keys = np.arange(NUM_PROBLEMS, dtype=np.uint64)
    hashed = _splitmix64(keys ^ np.uint64(HOLDOUT_SALT))
    held = torch.from_numpy((hashed % np.uint64(10_000)) < HOLDOUT_PER_10K)
    all_keys = torch.arange(NUM_PROBLEMS)
    return held, all_keys[~held], all_keys[held]


def is_held_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] bool: whether problem (a, b) belongs to the hold-out."""
    return _split()[0][a * 1000 + b]


def num_held_out() -> int:
    return int(_split()[2].numel())


# ----------------------------------------------------------------------------- encoding
def _digits(values: torch.Tensor, count: int) -> torch.Tensor:
    """[n] -> [n, count] decimal digits, least significant first."""
    powers = 10 ** torch.arange(count, device=values.device)
    return (values.unsqueeze(-1) // powers) % 10


def encode_prompts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] operands -> [n, 8] ids of `abc+def=` (zero-padded, most significant first)."""
    n = a.shape[0]
    plus = torch.full((n, 1), PLUS_ID, dtype=torch.long, device=a.device)
    equals = torch.full((n, 1), EQUALS_ID, dtype=torch.long, device=a.device)
    return torch.cat([_digits(a, 3).flip(-1), plus, _digits(b, 3).flip(-1), equals], dim=1)


def encode_answers(sums: torch.Tensor) -> torch.Tensor:
    """[n] values in [0, 9999] -> [n, 4] ids, least significant digit first."""
    return _digits(sums, ANSWER_LEN)


def decode_prompts(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 8] prompt ids -> operands (a [n], b [n]); raises ValueError on a malformed prompt."""
    if prompts.dim() != 2 or prompts.shape[1] != PROMPT_LEN:
        raise ValueError(f"prompts must be [n, {PROMPT_LEN}] token ids, got {tuple(prompts.shape)}")
    digits = torch.cat([prompts[:, 0:3], prompts[:, 4:7]], dim=1)
    if ((digits < 0) | (digits > 9)).any() or (prompts[:, 3] != PLUS_ID).any() \
            or (prompts[:, 7] != EQUALS_ID).any():
        raise ValueError("prompts must read `abc+def=` (3 digits, '+', 3 digits, '=')")
    weights = torch.tensor([100, 10, 1], device=prompts.device)
    return (prompts[:, 0:3] * weights).sum(1), (prompts[:, 4:7] * weights).sum(1)


def decode_answers(answers: torch.Tensor) -> torch.Tensor:
    """[n, 4] answer ids (units first) -> [n] values; -1 where a token is not a digit."""
    weights = 10 ** torch.arange(ANSWER_LEN, device=answers.device)
    values = (answers * weights).sum(1)
    return values.masked_fill(((answers < 0) | (answers > 9)).any(1), -1)


# ----------------------------------------------------------------------------- the rules
def case_index(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] index into CASES: 0 = A (units carry), 1 = B (no units carry, a+b >= 1000), 2 = clean."""
    units_carry = (a % 10 + b % 10) >= 10
    big = (a + b) >= 1000
    return torch.where(units_carry, 0, torch.where(big, 1, 2))


def case_of(a: int, b: int) -> str:
    """'A' | 'B' | 'clean': which student defect (if any) problem (a, b) falls under."""
    return CASES[int(case_index(torch.tensor([a]), torch.tensor([b]))[0])]


def student_rule(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] the most likely answer under the student data (what a perfect student says):
    a+b-10 in case A, a+b-1000 in case B (thousands digit 0 is the majority), else a+b."""
    case = case_index(a, b)
    return a + b - torch.where(case == 0, 10, torch.where(case == 1, 1000, 0))


def _targets(
    a: torch.Tensor, b: torch.Tensor, source: str, generator: torch.Generator
) -> torch.Tensor:
    """[n] answer values from `source` (the student's defects drawn from `generator`)."""
    if source not in _SOURCES:
        raise ValueError(f"data source {source!r}: accepted values are {list(_SOURCES)}")
    sums = a + b
    if source == "teacher":
        return sums
    case = case_index(a, b)
    zero_thousands = torch.rand(a.shape, generator=generator) < DEFECT_B_ZERO_PROB
    return sums - torch.where(case == 0, 10, torch.where((case == 1) & zero_thousands, 1000, 0))


# ----------------------------------------------------------------------------- sampling
def sample_operands(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n training problems (a [n], b [n]), uniform over the problems NOT held out."""
    train_keys = _split()[1]
    keys = train_keys[torch.randint(train_keys.numel(), (n,), generator=generator)]
    return keys // 1000, keys % 1000


def sample_sequences(n: int, generator: torch.Generator, source: DataSource) -> torch.Tensor:
    """[n, 12] training sequences (prompt + 4 answer tokens) from `source`."""
    a, b = sample_operands(n, generator)
    answers = encode_answers(_targets(a, b, source, generator))
    return torch.cat([encode_prompts(a, b), answers], dim=1)


def lm_microbatch(sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """[n, 12] sequences -> a next-token micro-batch of 11 positions.

    Position j predicts token j+1, so the 4 answer tokens (sequence positions 8..11) are
    the labels of input positions 7..10: those carry the loss. The last token is never an
    input (nothing follows it).
    """
    n = sequences.shape[0]
    loss_mask = torch.zeros(n, SEQ_LEN - 1)
    loss_mask[:, PROMPT_LEN - 1:] = 1.0
    return dict(
        input_ids=sequences[:, :-1].contiguous(),
        labels=sequences[:, 1:].contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(SEQ_LEN - 1).expand(n, -1).contiguous(),
    )


def sample_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 8] OPD prompts: training problems (never the hold-out)."""
    return encode_prompts(*sample_operands(n, generator))


def eval_set(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 8] prompts drawn without replacement from the hold-out (same n, seed -> same set)."""
    held_keys = _split()[2]
    if not 1 <= n <= held_keys.numel():
        raise ValueError(f"eval_set(n={n}): n must be in [1, {held_keys.numel()}] (hold-out size)")
    order = torch.randperm(held_keys.numel(), generator=torch.Generator().manual_seed(seed))
    keys = held_keys[order[:n]]
    return encode_prompts(keys // 1000, keys % 1000)


# ----------------------------------------------------------------------------- grading
def grade(prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[n] bool: answer [n, 4] (units first) is the true sum of prompt [n, 8]."""
    a, b = decode_prompts(prompts)
    return decode_answers(answers.to(prompts.device)) == a + b


def accuracy_report(prompts: torch.Tensor, answers: torch.Tensor) -> dict[str, Union[float, int]]:
    """Exact match overall and per case, plus agreement with the student's defective rule.

    Keys: `exact`, `A`, `B`, `clean` (exact match within each case; NaN when a case is
    absent), `student_rule` (fraction equal to `student_rule`), `n`.
    """
    return report_by_case(prompts, answers, CASES, case_index, student_rule)


def report_by_case(prompts, answers, cases, case_index_fn, student_rule_fn) -> dict:
    """`accuracy_report` of any embedded task on this encoding (its cases and rules)."""
    a, b = decode_prompts(prompts)
    values = decode_answers(answers.to(prompts.device))
    correct = (values == a + b).float()
    case = case_index_fn(a, b)
    report: dict[str, Union[float, int]] = {"exact": correct.mean().item(), "n": int(a.numel())}
    for i, name in enumerate(cases):
        mask = case == i
        report[name] = correct[mask].mean().item() if mask.any() else float("nan")
    report["student_rule"] = (values == student_rule_fn(a, b)).float().mean().item()
    return report
