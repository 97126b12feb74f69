"""Turn local copies of the paper's datasets into the engine's prompt JSONL (docs/eval.md).

    python tools/prepare_data.py dapo    dapo-math-17k.parquet --out data/dapo_math_17k.jsonl
    python tools/prepare_data.py math500 math500/test.jsonl    --out data/math500.jsonl
    python tools/prepare_data.py aime    aime_2024.jsonl       --out data/aime24.jsonl

Inputs are .parquet or .jsonl files in the datasets' published column layouts:
  dapo     DAPO-Math-17k: `prompt` (chat messages; the user turn wraps the problem in DAPO's
           "Solve the following math problem step by step ... Answer:" instruction, which is
           removed), `reward_model.ground_truth`, optional `extra_info.index`
  math500  MATH-500: `problem`, `answer`, `solution`, `subject`, `level`, `unique_id`
  aime     AIME 2024/2025: `problem` | `Problem` | `question`, `answer` | `Answer`,
           optional `id` | `ID` | `problem_idx`, `year`
Each output row is {"id", "messages": [{"role": "user", "content": <instruction with the
problem>}] (or "prompt" with --format prompt), "answer", and subject/level/year when
present}. Rows with the same problem text are written once (DAPO-Math-17k repeats each
problem ~100 times); --keep-duplicates writes them all. Nothing here needs torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

INSTRUCTIONS = {
    # The TIP paper's: reason, then the final answer in \boxed{} (graded by `--grader math`).
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # DAPO-Math-17k's own (graded by `--grader regex`, whose default pattern reads "Answer:").
    "dapo": ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the "
             "answer to the problem.\n\n{problem}\n\nRemember to put your answer on its own "
             "line after \"Answer:\"."),
    "none": "{problem}",
}
_DAPO_HEAD = "Solve the following math problem step by step."
_DAPO_TAIL = "\n\nRemember to put your answer on its own line after"


class DataError(ValueError):
    """Bad input: the message names the file, row and what is accepted."""


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a .jsonl or .parquet file."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: parquet needs the pyarrow package (pip install pyarrow)") from None
        for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}, row {n}", row
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{path}, line {n}", json.loads(line)
                    except ValueError as err:
                        raise DataError(f"{path}, line {n}: invalid JSON ({err})") from None
    else:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; accepted: .jsonl, .json, .parquet")


def _field(row: dict, names: tuple[str, ...], where: str, required: bool = True) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    if required:
        raise DataError(f"{where}: no {' / '.join(repr(n) for n in names)} field "
                        f"(columns: {sorted(row)[:12]})")
    return None


def dapo_problem(prompt: Any, where: str) -> tuple[str, bool]:
    """The problem text of a DAPO `prompt` and whether DAPO's instruction was found around it."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise DataError(f"{where}: field 'prompt' holds no user message with string content")
        prompt = users[-1]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a list of chat messages or a string")
    text, found = prompt.strip(), False
    if text.startswith(_DAPO_HEAD) and "\n\n" in text:
        text, found = text.split("\n\n", 1)[1], True
    if _DAPO_TAIL in text:
        text, found = text.split(_DAPO_TAIL, 1)[0], True
    return text.strip(), found


def _dapo(row: dict, where: str) -> dict:
    problem, found = dapo_problem(_field(row, ("prompt",), where), where)
    reward = _field(row, ("reward_model",), where)
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise DataError(f"{where}: field 'reward_model' must hold 'ground_truth'")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return {"id": extra.get("index"), "problem": problem, "answer": reward["ground_truth"],
            "dapo_instruction_found": found}


def _math500(row: dict, where: str) -> dict:
    return {"id": row.get("unique_id"), "problem": _field(row, ("problem",), where),
            "answer": _field(row, ("answer",), where), "subject": row.get("subject"),
            "level": row.get("level")}


def _aime(row: dict, where: str) -> dict:
    return {"id": _field(row, ("id", "ID", "problem_idx"), where, required=False),
            "problem": _field(row, ("problem", "Problem", "question"), where),
            "answer": _field(row, ("answer", "Answer"), where), "year": row.get("year")}


READERS: dict[str, Callable[[dict, str], dict]] = {"dapo": _dapo, "math500": _math500, "aime": _aime}


def instruction_template(value: str) -> str:
    """A preset name (boxed, dapo, none) or a template holding {problem}."""
    template = INSTRUCTIONS.get(value, value)
    if "{problem}" not in template:
        raise DataError(f"--instruction {value!r}: a preset {sorted(INSTRUCTIONS)} or a template "
                        "containing {problem}")
    return template


def convert(dataset: str, inputs: list[Path], template: str, fmt: str = "messages",
            dedup: bool = True) -> tuple[list[dict], dict[str, int]]:
    """Output rows and counts (num_rows, num_written, num_duplicates, num_unrecognised)."""
    read, seen = READERS[dataset], set()
    out: list[dict] = []
    stats = {"num_rows": 0, "num_written": 0, "num_duplicates": 0, "num_unrecognised": 0}
    for path in inputs:
        for where, row in _rows(Path(path)):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            item = read(row, where)
            stats["num_rows"] += 1
            stats["num_unrecognised"] += int(not item.pop("dapo_instruction_found", True))
            problem = item.pop("problem")
            if not isinstance(problem, str) or not problem.strip():
                raise DataError(f"{where}: the problem must be a non-empty string")
            if dedup and problem in seen:
                stats["num_duplicates"] += 1
                continue
            seen.add(problem)
            out.append(_output_row(item, problem, template, fmt, len(out)))
    stats["num_written"] = len(out)
    return out, stats


def _output_row(item: dict, problem: str, template: str, fmt: str, index: int) -> dict:
    # str.replace, not str.format: problems are full of LaTeX braces.
    text = template.replace("{problem}", problem)
    prompt = {"messages": [{"role": "user", "content": text}]} if fmt == "messages" else {"prompt": text}
    pid = item.pop("id")
    row = {"id": str(pid) if pid is not None else str(index), **prompt, "answer": str(item.pop("answer"))}
    row.update({k: v for k, v in item.items() if v is not None})
    return row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(READERS))
    p.add_argument("inputs", nargs="+", type=Path, help=".parquet or .jsonl files")
    p.add_argument("--out", required=True, type=Path, help="prompt JSONL to write")
    p.add_argument("--instruction", default="boxed",
                   help="preset boxed (the paper's, default), dapo, none, or a template with {problem}")
    p.add_argument("--format", choices=("messages", "prompt"), default="messages",
                   help="one user message (default) or a plain prompt string")
    p.add_argument("--keep-duplicates", action="store_true", help="write repeated problems too")
    args = p.parse_args(argv)
    try:
        rows, stats = convert(args.dataset, args.inputs, instruction_template(args.instruction),
                              args.format, dedup=not args.keep_duplicates)
    except DataError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"{args.dataset}: {stats['num_rows']} rows read, {stats['num_written']} written to "
          f"{args.out} ({stats['num_duplicates']} duplicates dropped"
          + (f", {stats['num_unrecognised']} without DAPO's instruction" if args.dataset == "dapo" else "")
          + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
