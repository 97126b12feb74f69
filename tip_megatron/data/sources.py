"""Prompt files: JSONL / parquet sources, row parsing and validation, content fingerprints.

A source streams its rows once at setup (`rows()`) and reads a batch's rows back by
locator (`fetch()`: a JSONL byte offset or a parquet row index). Formats, fields and
error messages: docs/data.md. The tokenized dataset is `rollout.data.PromptDataset`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

CHUNK_ROWS = 512
"""Rows per parquet batch and per tokenizer call."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as the engine uses it."""

    prompt_id: str  # the row's id field, else "<file name>:<line or row>"
    token_ids: list[int]  # after chat template and the overlong policy
    answer: str | None  # the answer field, for grading; None when absent
    text: str  # the prompt field; for chat rows the last user message's content
    messages: list[dict[str, Any]] | None = None  # chat rows: the prompt turns
    # "<file>, line <n>" (or row): named by errors about this prompt; not part of equality
    where: str = field(default="", compare=False)
    tools: list[dict[str, Any]] | None = None  # chat rows: tool schemas for the template


@dataclass(frozen=True)
class PromptFields:
    """Names of the fields read from each row; a `messages` field wins over `prompt`."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    id: str = "id"
    tools: str = "tools"
    route: str | None = None  # data.route_field (several teachers): required in every row


@dataclass(frozen=True)
class Row:
    prompt_id: str
    text: str
    messages: list[dict[str, Any]] | None
    answer: str | None
    dropped_turns: int  # trailing assistant turns removed from `messages`
    tools: list[dict[str, Any]] | None = None  # tool schemas handed to the chat template
    route: str | None = None  # the value of `PromptFields.route` (picks the prompt's teacher)


def _check_messages(value: Any, field: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of "
                         f"{{role, content}} objects, got {type(value).__name__}")
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: {field}[{k}] must be an object with string 'role' "
                             f"and 'content', got {m!r:.200}")
    return value


def parse_row(row: Any, fields: PromptFields, where: str, default_id: str) -> Row:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages, dropped = row.get(fields.messages), 0
    if messages is not None:
        messages = _check_messages(messages, fields.messages, where)
        # The prompt is everything before the reply: a trailing assistant turn (SFT-style
        # rows) is what the student should generate, not condition on.
        while messages and messages[-1]["role"] == "assistant":
            messages, dropped = messages[:-1], dropped + 1
        if not messages:
            raise ValueError(f"{where}: field {fields.messages!r} holds only assistant turns")
        users = [m["content"] for m in messages if m["role"] == "user"]
        text = users[-1] if users else messages[-1]["content"]
    else:
        text = row.get(fields.prompt)
        if text is None:
            raise ValueError(f"{where}: no {fields.prompt!r} or {fields.messages!r} field "
                             f"(keys: {sorted(row)[:10]})")
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {fields.prompt!r} must be a string, "
                             f"got {type(text).__name__}")
    answer = row.get(fields.answer)
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: field {fields.answer!r} must be a string or number, "
                             f"got {type(answer).__name__}")
        answer = str(answer)
    pid = row.get(fields.id)
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
        raise ValueError(f"{where}: field {fields.id!r} must be a string or integer, "
                         f"got {type(pid).__name__}")
    tools = row.get(fields.tools)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: field {fields.tools!r} must be a list of tool schema objects "
                         f"(JSON objects), got {tools!r:.200}")
    route = None
    if fields.route is not None:
        route = row.get(fields.route)
        if route is None:
            raise ValueError(f"{where}: no {fields.route!r} field (data.route_field: every record "
                             f"names the value that picks its teacher; keys: {sorted(row)[:10]})")
        if isinstance(route, bool) or not isinstance(route, (str, int)):
            raise ValueError(f"{where}: field {fields.route!r} must be a string or integer "
                             f"(data.route_field), got {type(route).__name__}")
        route = str(route)
    return Row(default_id if pid is None else str(pid), text, messages, answer, dropped, tools, route)


@dataclass(frozen=True)
class Fingerprint:
    """What a prompt file's content is: its size and a hash of its bytes (not its mtime,
    which a `touch`, a copy or a checkout changes without changing a single prompt)."""

    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def fingerprint(path: Path) -> Fingerprint:
    """The file's `Fingerprint`, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return Fingerprint(path.name, size, digest.hexdigest())


class Source:
    """One file: `rows()` streams (line, locator, row); `fetch()` reads rows back by locator."""

    def __init__(self, path: Path):
        self.path = path
        self.fingerprint = fingerprint(path)
        self._stat = self._stat_key()

    def _stat_key(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns

    def where(self, line: int) -> str:
        return f"{self.path}, line {line}"

    def default_id(self, line: int) -> str:
        return f"{self.path.name}:{line}"

    def check_unchanged(self) -> None:
        """Refuse to read rows back from a file whose content changed since loading.

        A stat is cheap, a hash is not: the content is hashed again only when size or
        mtime moved, and an equal hash (a `touch`) is accepted and remembered.
        """
        stat = self._stat_key()
        if stat == self._stat:
            return
        if stat[0] == self.fingerprint.size and fingerprint(self.path) == self.fingerprint:
            self._stat = stat
            return
        raise RuntimeError(f"prompt file {self.path} changed after it was loaded (its content "
                           "differs, not only its mtime); restart the run to reload it")


class _JsonlSource(Source):
    def rows(self) -> Iterator[tuple[int, int, Any]]:
        offset = 0
        with open(self.path, "rb") as f:  # bytes: exact offsets, and only b"\n" ends a line
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield line_no, offset, self._loads(line, line_no)
                offset += len(line)

    def fetch(self, locators: Sequence[int], lines: Sequence[int]) -> list[Any]:
        self.check_unchanged()
        with open(self.path, "rb") as f:
            out = []
            for loc, line_no in zip(locators, lines):
                f.seek(loc)
                out.append(self._loads(f.readline(), line_no))
        return out

    def _loads(self, line: bytes, line_no: int) -> Any:
        try:
            return json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{self.where(line_no)}: invalid JSON ({e})") from None


def _import_parquet() -> Any:
    try:
        # optional extra [hf]: only parquet files need pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("parquet prompt files need the `pyarrow` package: "
                          "`pip install pyarrow` (or 'tip_megatron[hf]')") from e
    return pq


class _ParquetSource(Source):
    def __init__(self, path: Path, fields: PromptFields):
        super().__init__(path)
        pq = _import_parquet()
        self._file = pq.ParquetFile(path)
        names = self._file.schema_arrow.names
        if fields.prompt not in names and fields.messages not in names:
            raise ValueError(f"{path}: no {fields.prompt!r} or {fields.messages!r} column "
                             f"(columns: {names[:20]})")
        wanted = (fields.prompt, fields.messages, fields.answer, fields.id, fields.tools)
        self._columns = [c for c in dict.fromkeys(wanted) if c in names]
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._group_starts = np.cumsum([0, *sizes])

    def where(self, line: int) -> str:
        return f"{self.path}, row {line}"

    def rows(self) -> Iterator[tuple[int, int, Any]]:
        row_idx = 0
        for batch in self._file.iter_batches(batch_size=CHUNK_ROWS, columns=self._columns):
            for row in batch.to_pylist():
                row_idx += 1
                yield row_idx, row_idx - 1, row

    def fetch(self, locators: Sequence[int], lines: Sequence[int]) -> list[Any]:
        # Reads each row group the batch touches once; see docs/data.md on row group size.
        self.check_unchanged()
        locs = np.asarray(locators, dtype=np.int64)
        groups = np.searchsorted(self._group_starts, locs, side="right") - 1
        out: list[Any] = [None] * len(locs)
        for g in np.unique(groups):
            pos = np.nonzero(groups == g)[0]
            table = self._file.read_row_group(int(g), columns=self._columns)
            rows = table.take(locs[pos] - self._group_starts[g]).to_pylist()
            for p, row in zip(pos, rows):
                out[p] = row
        return out


def open_source(path: Path, fields: PromptFields) -> Source:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; accepted: .jsonl / "
                                ".json (one JSON object per line) and .parquet files")
    if path.suffix == ".parquet":
        return _ParquetSource(path, fields)
    if path.suffix in (".jsonl", ".json"):
        return _JsonlSource(path)
    raise ValueError(f"prompt file {path}: unknown extension {path.suffix!r}; accepted: "
                     ".jsonl, .json (one JSON object per line), .parquet")
