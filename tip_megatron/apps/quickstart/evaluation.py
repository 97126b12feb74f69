"""The quickstart's accuracy, through the engine's eval path (`train.validation`).

    report = evaluate(chunks, groups, arch)      # {"exact", "A", "B", "clean", "n"}
    report = evaluate(chunks, groups, arch, data=chain_task)   # {"exact", "chain", "clean", "n"}
    state.validation = MidRunValidation(every=30)  # the trainer logs eval/* every 30 steps

The hold-out problems are a benchmark (prompt `abc+def=`, answer the sum written units
first, e.g. `2850`), sampled greedily (temperature 0, 4 new tokens) by the generation
engine and graded by the registered `quickstart-addition` grader: exact match of the 4
answer characters. The per-defect columns come from the per-prompt counts the eval path
returns, grouped by the task's `case_index`. Every embedded task (`apps/quickstart/tasks.py`)
writes sums this way, so they share the grader; `data` (default `task`, the addition
task) is the task's data module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from tip_megatron.eval import Grade, GRADERS, register_grader
from tip_megatron.apps.quickstart import task, tools_task
from tip_megatron.data.sources import PromptRecord
from tip_megatron.train.validation import ValidationSpec, evaluate_in_engine

GRADER = "quickstart-addition"


def grade_addition(response: str, answer: str) -> Grade:
    """Exact match of the 4 answer digits (units first); anything else is unparsed."""
    text = response.strip()
    parsed = len(text) == task.ANSWER_LEN and text.isdigit()
    return Grade(correct=parsed and text == answer, unparsed=not parsed, extracted=text or None,
                 normalized=text or None)


def grade_tools(response: str, answer: str) -> Grade:
    """The tools task (`tools_task.py`): the transcript after the prompt reads the two calls
    and their observations, then the 4 answer digits (units first), which must be `answer`."""
    text = response.strip()
    parsed = tools_task.parse_answer(text) is not None
    written = text[-task.ANSWER_LEN:] if parsed else None
    return Grade(correct=parsed and written == answer, unparsed=not parsed, extracted=written,
                 normalized=written)


for _name, _grade in ((GRADER, grade_addition), (tools_task.GRADER, grade_tools)):
    if _name not in GRADERS:
        register_grader(_name, lambda g=_grade: g)


@dataclass(frozen=True)
class AdditionBenchmark:
    """The hold-out set as the eval path reads a benchmark (`len`, `records`), in memory."""

    prompts: torch.Tensor  # [n, 8]
    student_rule: bool = False
    """Answers by the student data's rule (`data.student_rule`) instead of the true sums."""
    data: ModuleType = task

    def __len__(self) -> int:
        return self.prompts.shape[0]

    def records(self, indices: Sequence[int]) -> list[PromptRecord]:
        rows = self.prompts[list(indices)]
        answers = self.data.encode_answers(answer_values(self.data, rows, self.student_rule))
        tok = self.data.tokenizer()
        return [PromptRecord(prompt_id=str(i), token_ids=rows[k].tolist(),
                             answer=tok.decode(answers[k].tolist()), text=tok.decode(rows[k].tolist()))
                for k, i in enumerate(indices)]


def answer_values(data: ModuleType, prompts: torch.Tensor, student_rule: bool = False) -> torch.Tensor:
    """[n] the answers of prompts [n, 8]: the data module's `prompt_values` when it has one
    (the multi task: sums and differences), else the sums a + b (student_rule: the
    student data's `student_rule(a, b)`)."""
    if hasattr(data, "prompt_values"):
        return data.prompt_values(prompts, student_rule)
    a, b = data.decode_prompts(prompts)
    return data.student_rule(a, b) if student_rule else a + b


def case_indices(data: ModuleType, prompts: torch.Tensor) -> torch.Tensor:
    """[n] index into `data.CASES` of prompts [n, 8] (`prompt_case_index` when defined)."""
    if hasattr(data, "prompt_case_index"):
        return data.prompt_case_index(prompts)
    return data.case_index(*data.decode_prompts(prompts))


#: Greedy, the task's 4 answer tokens, one sample per prompt: mean@1 is exact-match accuracy.
SPEC = ValidationSpec(n=1, temperature=0.0, max_new_tokens=task.ANSWER_LEN, grader=GRADER,
                      batch_size=1024)


def spec_of(data: ModuleType) -> ValidationSpec:
    """`SPEC`, or for a multi-turn task (its `GENERATION`: the budget and the environment)
    the same greedy one-sample spec with its environment and its grader."""
    generation = getattr(data, "GENERATION", None)
    if generation is None:
        return SPEC
    options = {k: v for k, v in generation.items() if k != "max_new_tokens"}
    return ValidationSpec(n=1, temperature=0.0, max_new_tokens=generation["max_new_tokens"],
                          grader=data.GRADER, batch_size=SPEC.batch_size, multi_turn=options)


def evaluate(chunks, groups, arch, n: int = 2000, student_rule: bool = False,
             data: ModuleType = task) -> dict:
    """Greedy exact match on `n` hold-out problems: overall (`exact`) and per case of
    `data.CASES` (`A`, `B`, `clean` for the addition task; NaN when a case is absent), and
    `n` (collective; the same on every rank); a task with DOMAINS (the multi task) also
    per domain (`add`, `sub`). student_rule: also `student_rule`, the
    agreement with the student data's most likely answer (a second pass graded against
    those answers)."""
    bench = AdditionBenchmark(data.eval_set(n), data=data)
    spec = spec_of(data)
    result = evaluate_in_engine(chunks, groups, arch, data.tokenizer(), bench, spec)
    correct = torch.tensor([float(c.num_correct) for c in result.counts])
    report = {"exact": result.summary.mean_at_k, "n": len(bench)}
    index_sets = [(data.CASES, case_indices(data, bench.prompts))]
    if hasattr(data, "DOMAINS"):  # the multi task: per domain too
        index_sets.insert(0, (data.DOMAINS, data.domain_index(bench.prompts)))
    for names, index in index_sets:
        for i, name in enumerate(names):
            mask = index == i
            report[name] = correct[mask].mean().item() if mask.any() else float("nan")
    if student_rule:
        rule = evaluate_in_engine(chunks, groups, arch, data.tokenizer(),
                                  AdditionBenchmark(bench.prompts, True, data), spec)
        report["student_rule"] = rule.summary.mean_at_k
    return report


def write_benchmark(path, n: int, data: ModuleType = task, case=None) -> int:
    """Write `n` hold-out problems (only those of `case` when given) as a benchmark JSONL
    (`prompt`, `answer`: the true sum units first) for `eval.prompts`, so validation during
    training (`eval.every`, grader `quickstart-addition`) traces a task's accuracy mid-run.
    Returns the number of records written (fewer than n when the case has fewer)."""
    held = data.eval_set(task.num_held_out())
    if case is not None:
        if case not in data.CASES:
            raise ValueError(f"case {case!r}: accepted: {list(data.CASES)}")
        held = held[case_indices(data, held) == data.CASES.index(case)]
    records = AdditionBenchmark(held[:n], data=data).records(range(min(n, len(held))))
    Path(path).write_text("".join(json.dumps({"prompt": r.text, "answer": r.answer}) + "\n"
                                  for r in records))
    return len(records)


def eval_metrics(report: dict, data: ModuleType = task) -> dict[str, float]:
    """An `evaluate` report as the trainer logs validation: `eval/mean_at_k` (greedy, one
    sample: the exact match) and `eval/<case>` per planted case of the task (and per domain
    of a task with DOMAINS: `eval/add`, `eval/sub`)."""
    keys = (*getattr(data, "DOMAINS", ()), *data.CASES)
    return {"eval/mean_at_k": report["exact"], **{f"eval/{c}": report[c] for c in keys}}


@dataclass(frozen=True)
class MidRunValidation:
    """The trainer's validation hook (`Run.validation`) on the hold-out problems: every
    `every` steps, `evaluate` on the current student, logged with the step (`eval_metrics`).
    Greedy decoding reads no random stream, so the training run is unchanged by it."""

    every: int
    n: int = 2000
    data: ModuleType = task

    def __call__(self, run) -> dict[str, float]:
        report = evaluate(run.ddp, run.groups, run.models.student_arch, n=self.n, data=self.data)
        return eval_metrics(report, self.data)
