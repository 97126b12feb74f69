"""The third embedded task: addition whose operands only a tool call can fetch.

Shapes: prompts [n, 7] (a 6-digit ticket and `:`), transcripts [n, 14] (what follows the
prompt: the model's turns and the environment's observations), sequences [n, 21]; operands
a, b [n] int64 in [0, 999].

    prompt        turn 0  obs 0   turn 1  obs 1   turn 2
    `482913:`     `a?`    `583`   `b?`    `926`   `9041`
                                                   (385 + 629 = 1014, units first)

The prompt is a ticket: a fixed random permutation of the problem key a * 1000 + b, so the
operands cannot be read from it (the hold-out's tickets are never trained on). The model
calls the register tool (`a?` then `b?`; a turn ends at `?`), the deterministic environment
`RegisterEnv` answers each call with the register's 3 digits, units first, and the model
writes the sum, units first (4 digits). The rollout ends there: 14 tokens after the prompt,
of which the model's are 8 (the 2 calls of 2 tokens and the 4 answer digits) and the 6
observation tokens are context only.

Two data sources, with the same calls and observations:
- `teacher`: correct sums;
- `student`: one planted defect in how it USES the tool results, case `b9` (the fetched
  register b ends in 9 and a does not end in 0, so the units column carries: 9% of
  problems): it drops that carry (answer a + b - 10: the units digit is right, the tens
  digit one too low, confident and wrong; the hundreds too when the tens carried).
Hold-out, tickets and operand sampling are the addition task's problems (`task.py`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Union

import torch

from tip_megatron.apps.quickstart import task
from tip_megatron.apps.quickstart.task import (  # noqa: F401  the shared problems, re-exported
    DataSource, is_held_out, sample_operands,
)
from tip_megatron.data.tokenizers import CharTokenizer
from tip_megatron.rollout.env import Observation, Turn

NAME = "tools"
CASES = ("b9", "clean")
#: Column label of each case in the study's tables (the case name, then this).
CASE_LABELS = {"b9": "carry after b's 9 dropped", "clean": ""}
#: Bump when the task's data or encoding changes: it is part of the pre-training cache key.
TASK_VERSION = 1

CHARS = "0123456789+=:ab?"
TICKET_LEN = 6
PROMPT_LEN = TICKET_LEN + 1
ANSWER_LEN = 4
OPERAND_LEN = 3
#: Tokens after the prompt: `a?` + 3 + `b?` + 3 + the 4 answer digits.
RESPONSE_LEN = 2 + OPERAND_LEN + 2 + OPERAND_LEN + ANSWER_LEN
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
COLON, REG_A, REG_B, CALL = (CHARS.index(c) for c in ":ab?")
TICKET_SALT = 0x70015
#: Response positions (0-based, after the prompt) the model writes; the rest are observations.
AGENT_POSITIONS = (0, 1, 5, 6, 10, 11, 12, 13)
ENV_PATH = "tip_megatron.apps.quickstart.tools_task:RegisterEnv"
#: The generation settings of every rollout and evaluation of this task (rollout.*).
GENERATION = dict(max_new_tokens=RESPONSE_LEN, env=ENV_PATH, max_turns=3, turn_stop=("?",))
GRADER = "quickstart-tools"


def tokenizer() -> CharTokenizer:
    """`0123456789+=:ab?` (digits are ids 0-9, `:` 12, `a` 13, `b` 14, `?` 15), eos 16, pad 17."""
    return CharTokenizer(CHARS)


# ----------------------------------------------------------------------------- tickets
@lru_cache(maxsize=1)
def _tickets() -> tuple[torch.Tensor, torch.Tensor]:
    """(ticket of each problem key [10^6], problem key of each ticket [10^6])."""
    perm = torch.randperm(task.NUM_PROBLEMS, generator=torch.Generator().manual_seed(TICKET_SALT))
    return perm, torch.argsort(perm)


def _digits(values: torch.Tensor, count: int) -> torch.Tensor:
    return (values.unsqueeze(-1) // 10 ** torch.arange(count)) % 10


def encode_prompts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] operands -> [n, 7] ids of the ticket (6 digits, most significant first) and `:`."""
    ticket = _tickets()[0][a * 1000 + b]
    colon = torch.full((a.shape[0], 1), COLON, dtype=torch.long)
    return torch.cat([_digits(ticket, TICKET_LEN).flip(-1), colon], dim=1)


def decode_prompts(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 7] prompt ids -> operands (a [n], b [n]); ValueError on a malformed prompt."""
    if prompts.dim() != 2 or prompts.shape[1] != PROMPT_LEN:
        raise ValueError(f"prompts must be [n, {PROMPT_LEN}] token ids, got {tuple(prompts.shape)}")
    digits = prompts[:, :TICKET_LEN]
    if ((digits < 0) | (digits > 9)).any() or (prompts[:, TICKET_LEN] != COLON).any():
        raise ValueError("prompts must read `dddddd:` (a 6-digit ticket, then ':')")
    ticket = (digits.cpu() * 10 ** torch.arange(TICKET_LEN - 1, -1, -1)).sum(1)
    key = _tickets()[1][ticket]
    return key // 1000, key % 1000


def operands_of_text(text: str) -> tuple[int, int]:
    """(a, b) of a prompt's text `dddddd:`; ValueError naming the accepted form otherwise."""
    if len(text) < PROMPT_LEN or not text[:TICKET_LEN].isdigit() or text[TICKET_LEN] != ":":
        raise ValueError(f"prompt {text!r}: the tools task's prompts read `dddddd:` (a ticket)")
    key = int(_tickets()[1][int(text[:TICKET_LEN])])
    return key // 1000, key % 1000


def encode_answers(sums: torch.Tensor) -> torch.Tensor:
    """[n] values in [0, 9999] -> [n, 4] ids, least significant digit first."""
    return _digits(sums, ANSWER_LEN)


def transcripts(a: torch.Tensor, b: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """[n, 14] what follows the prompt: `a?`, a's digits, `b?`, b's digits, the sum's."""
    n = a.shape[0]
    call = lambda reg: torch.tensor([reg, CALL]).expand(n, 2)  # noqa: E731
    return torch.cat([call(REG_A), _digits(a, OPERAND_LEN), call(REG_B), _digits(b, OPERAND_LEN),
                      encode_answers(sums)], dim=1)


# ----------------------------------------------------------------------------- the environment
class RegisterEnv:
    """The register tool of one rollout (`rollout.env`), built from its prompt record: a
    turn ending `a?` (or `b?`) is answered with register a's (b's) 3 digits, units first;
    any other turn ends the rollout (nothing appended)."""

    def __init__(self, record: Any):
        self.a, self.b = operands_of_text(record.text)

    def step(self, turn: Turn) -> Union[Observation, None]:
        name = turn.text[-2:]
        if name not in ("a?", "b?"):
            return None
        value = self.a if name == "a?" else self.b
        return Observation("".join(str(value // 10 ** k % 10) for k in range(OPERAND_LEN)))


# ----------------------------------------------------------------------------- the rules
def case_index(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] index into CASES: 0 = b9 (b's units digit is 9 and a's is not 0), 1 = clean."""
    return torch.where((b % 10 == 9) & (a % 10 != 0), 0, 1)


def student_rule(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] the student data's answer: a+b-10 in case b9, else a+b (deterministic)."""
    return torch.where(case_index(a, b) == 0, a + b - 10, a + b)


def sample_sequences(n: int, generator: torch.Generator, source: DataSource) -> torch.Tensor:
    """[n, 21] training sequences (prompt + the whole transcript) from `source`."""
    if source not in ("teacher", "student"):
        raise ValueError(f"data source {source!r}: accepted values are ['teacher', 'student']")
    a, b = sample_operands(n, generator)
    sums = a + b if source == "teacher" else student_rule(a, b)
    return torch.cat([encode_prompts(a, b), transcripts(a, b, sums)], dim=1)


def lm_microbatch(sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """[n, 21] sequences -> a next-token micro-batch of 20 positions; the loss is on the
    model's 8 tokens (calls and answer), never on the prompt or the observations."""
    n = sequences.shape[0]
    loss_mask = torch.zeros(n, SEQ_LEN - 1)
    loss_mask[:, [PROMPT_LEN - 1 + p for p in AGENT_POSITIONS]] = 1.0
    return dict(input_ids=sequences[:, :-1].contiguous(), labels=sequences[:, 1:].contiguous(),
                loss_mask=loss_mask, position_ids=torch.arange(SEQ_LEN - 1).expand(n, -1).contiguous())


def sample_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 7] OPD prompts: training problems (never the hold-out)."""
    return encode_prompts(*sample_operands(n, generator))


def eval_set(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 7] prompts of the addition task's hold-out problems (same n, seed -> same set)."""
    a, b = task.decode_prompts(task.eval_set(n, seed))
    return encode_prompts(a, b)


# ----------------------------------------------------------------------------- grading
def parse_answer(text: str) -> Union[int, None]:
    """The sum a transcript's text writes (`a?ddd` `b?ddd` then 4 digits, units first);
    None when it does not read so."""
    if len(text) != RESPONSE_LEN or text[0:2] != "a?" or text[5:7] != "b?" \
            or not (text[2:5] + text[7:10] + text[10:]).isdigit():
        return None
    return int(text[10:][::-1])


def grade(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """[n] bool: the transcript [n, 14] reads the calls, then the true sum."""
    a, b = decode_prompts(prompts)
    tok = tokenizer()
    values = torch.tensor([-1 if (v := parse_answer(tok.decode(r.tolist()))) is None else v
                           for r in responses])
    return values == a + b


def accuracy_report(prompts: torch.Tensor, responses: torch.Tensor) -> dict[str, Union[float, int]]:
    """Exact match overall (`exact`) and per case (`b9`, `clean`), `n`."""
    correct = grade(prompts, responses).float()
    cases = case_index(*decode_prompts(prompts))
    report: dict[str, Union[float, int]] = {"exact": correct.mean().item(), "n": int(correct.numel())}
    for i, name in enumerate(CASES):
        mask = cases == i
        report[name] = correct[mask].mean().item() if mask.any() else float("nan")
    return report
