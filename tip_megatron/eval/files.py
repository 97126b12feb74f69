"""Files of `tip-megatron eval`: samples JSONL in, answers joined from prompt files, graded
JSONL out. Row formats: docs/eval.md; prompt files: docs/data.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from tip_megatron.eval.evaluate import Sample
from tip_megatron.eval.graders import Grade

__all__ = ["attach_answers", "check_benchmark", "graded_rows", "read_answers", "read_samples",
           "to_samples", "write_jsonl"]

#: generate's per-sample fields the graded file does not repeat (they can be large).
_DROPPED = ("token_ids",)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}, line {line_no}: invalid JSON ({err})") from None
            yield f"{path}, line {line_no}", line_no, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        # optional: pyarrow, for parquet files only
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: parquet files need the pyarrow package: pip install pyarrow "
                          "(or 'tip_megatron[hf]')") from None
    table = pq.read_table(path)
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}, row {row_no}", row_no, row


def iter_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, 1-based line or row, row) of a .jsonl/.json or .parquet file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; accepted: .jsonl / .json (one JSON "
                                "object per line) and .parquet files")
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    raise ValueError(f"{path}: unknown extension {path.suffix!r}; accepted: .jsonl, .json, .parquet")


def _int_field(row: dict, name: str, where: str) -> int:
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: field {name!r} must be an integer >= 0, got {value!r:.80}")
    return value


def read_samples(path: Path) -> list[dict]:
    """Rows of a samples file (generate's format), checked; `_where` holds file and line."""
    rows = []
    for where, _, row in iter_rows(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for name in ("prompt_index", "sample_index"):
            _int_field(row, name, where)
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{where}: field 'text' (the response) must be a string, got "
                             f"{row.get('text')!r:.80}; accepted: the output of tip-megatron generate")
        answer = row.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise ValueError(f"{where}: field 'answer' must be a string or number, got "
                             f"{type(answer).__name__}")
        rows.append({**row, "_where": where})
    if not rows:
        raise ValueError(f"{path} holds no samples")
    return rows


def read_answers(paths: Sequence[Path], answer_field: str, id_field: str) -> dict[str, str]:
    """{prompt id: answer} of prompt files, ids as generate writes them (the id field, else
    "<file name>:<line or row>")."""
    out: dict[str, str] = {}
    for path in paths:
        for where, line_no, row in iter_rows(Path(path)):
            if not isinstance(row, dict) or row.get(answer_field) is None:
                raise ValueError(f"{where}: no {answer_field!r} field (set --answer-field)")
            pid = row.get(id_field)
            out[f"{Path(path).name}:{line_no}" if pid is None else str(pid)] = str(row[answer_field])
    return out


def attach_answers(rows: list[dict], answers: dict[str, str] | None, samples_path: Path) -> None:
    """Fill each row's missing `answer` from `answers` (by prompt_id), in place."""
    for row in rows:
        if row.get("answer") is not None:
            continue
        if answers is None:
            raise ValueError(f"{row['_where']}: no 'answer' field; generate copies it from the "
                             "prompt file's answer field: pass --answers <prompt file> (joined "
                             f"by prompt_id) to grade {samples_path}")
        pid = row.get("prompt_id")
        if pid is None or str(pid) not in answers:
            raise ValueError(f"{row['_where']}: prompt_id {pid!r} is not in the --answers files "
                             f"({len(answers)} ids, e.g. {next(iter(answers), None)!r})")
        row["answer"] = answers[str(pid)]


def to_samples(rows: Sequence[dict]) -> list[Sample]:
    return [Sample(int(r["prompt_index"]), int(r["sample_index"]), r["text"], str(r["answer"]))
            for r in rows]


def check_benchmark(paths: Sequence[str], fields) -> None:
    """Every row of the benchmark files has an answer and a prompt (before any model loads)."""
    for path in paths:
        for where, _, row in iter_rows(Path(path)):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if row.get(fields.prompt) is None and row.get(fields.messages) is None:
                raise ValueError(f"{where}: no {fields.prompt!r} or {fields.messages!r} field "
                                 "(set --prompt-field / --messages-field)")
            if row.get(fields.answer) is None:
                raise ValueError(f"{where}: no {fields.answer!r} field; eval needs every "
                                 "prompt's answer (set --answer-field)")


def graded_rows(rows: Sequence[dict], grades: Sequence[Grade]) -> Iterator[dict]:
    for row, g in zip(rows, grades, strict=True):
        out = {k: v for k, v in row.items() if k not in _DROPPED and not k.startswith("_")}
        yield {**out, "extracted": g.extracted, "normalized": g.normalized, "correct": g.correct,
               "unparsed": g.unparsed}


def write_jsonl(path: Path, rows) -> int:
    """Write rows to a temporary file, then rename (no partial output); the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
