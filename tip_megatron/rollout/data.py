"""Prompt data: JSONL / parquet files -> tokenized prompts, and a DP-sharded, seeded,
resumable sampler over them. Formats, fields and policies: docs/data.md.

Memory: one pass at setup validates every row (a malformed row stops the run there, with
file and line) and tokenizes it; the dataset then holds only the kept prompts' token ids
(one flat int32 array) and three ints per prompt (file, line, byte offset or row). Id,
answer and text are read back from the file for the prompts of each batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tip_megatron.rollout.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "OVERLONG_POLICIES",
    "PromptDataset",
    "PromptFields",
    "PromptLoader",
    "PromptRecord",
    "PromptSampler",
]

OVERLONG_POLICIES = ("truncate_left", "skip")
_CHUNK_ROWS = 512  # rows tokenized per encode_batch call


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as the engine uses it."""

    prompt_id: str  # the row's id field, else "<file name>:<line or row>"
    token_ids: list[int]  # after chat template and the overlong policy
    answer: str | None  # the answer field, for grading; None when absent
    text: str  # the prompt field; for chat rows the last user message's content
    messages: list[dict[str, Any]] | None = None  # chat rows: the prompt turns


@dataclass(frozen=True)
class PromptFields:
    """Names of the fields read from each row; a `messages` field wins over `prompt`."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    id: str = "id"


@dataclass(frozen=True)
class _Row:
    prompt_id: str
    text: str
    messages: list[dict[str, Any]] | None
    answer: str | None
    dropped_turns: int  # trailing assistant turns removed from `messages`


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


def _parse_row(row: Any, fields: PromptFields, where: str, default_id: str) -> _Row:
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
    return _Row(default_id if pid is None else str(pid), text, messages, answer, dropped)


class _Source:
    """One file: `rows()` streams (line, locator, row); `fetch()` reads rows back by locator."""

    def __init__(self, path: Path):
        self.path = path
        st = path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)

    def where(self, line: int) -> str:
        return f"{self.path}, line {line}"

    def default_id(self, line: int) -> str:
        return f"{self.path.name}:{line}"

    def check_unchanged(self) -> None:
        st = self.path.stat()
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise RuntimeError(f"prompt file {self.path} changed after it was loaded; "
                               "restart the run to reload it")


class _JsonlSource(_Source):
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
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("parquet prompt files need the `pyarrow` package: "
                          "`pip install pyarrow` (or 'tip_megatron[hf]')") from e
    return pq


class _ParquetSource(_Source):
    def __init__(self, path: Path, fields: PromptFields):
        super().__init__(path)
        pq = _import_parquet()
        self._file = pq.ParquetFile(path)
        names = self._file.schema_arrow.names
        if fields.prompt not in names and fields.messages not in names:
            raise ValueError(f"{path}: no {fields.prompt!r} or {fields.messages!r} column "
                             f"(columns: {names[:20]})")
        wanted = (fields.prompt, fields.messages, fields.answer, fields.id)
        self._columns = [c for c in dict.fromkeys(wanted) if c in names]
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._group_starts = np.cumsum([0, *sizes])

    def where(self, line: int) -> str:
        return f"{self.path}, row {line}"

    def rows(self) -> Iterator[tuple[int, int, Any]]:
        row_idx = 0
        for batch in self._file.iter_batches(batch_size=_CHUNK_ROWS, columns=self._columns):
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


def _open_source(path: Path, fields: PromptFields) -> _Source:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; accepted: .jsonl / "
                                ".json (one JSON object per line) and .parquet files")
    if path.suffix == ".parquet":
        return _ParquetSource(path, fields)
    if path.suffix in (".jsonl", ".json"):
        return _JsonlSource(path)
    raise ValueError(f"prompt file {path}: unknown extension {path.suffix!r}; accepted: "
                     ".jsonl, .json (one JSON object per line), .parquet")


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix a tokenizer's ValueError (unknown character, no chat template) with file:line."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _encode_located(batch_fn: Callable[[list[Any]], list[list[int]]],
                    row_fn: Callable[[Any], list[int]], inputs: list[Any],
                    wheres: list[str]) -> list[list[int]]:
    """`batch_fn(inputs)`; if it raises ValueError, row by row so the error names its row."""
    try:
        return batch_fn(inputs)
    except ValueError:
        out = []
        for x, where in zip(inputs, wheres):
            with _located(where):
                out.append(row_fn(x))
        return out


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PromptDataset:
    """Tokenized prompts from JSONL / parquet files, in file order, overlong policy applied.

    `stats` (ints): num_rows, num_kept, num_truncated, num_skipped, num_tokens (kept, after
    truncation), max_prompt_tokens (longest prompt before the policy),
    num_assistant_turns_dropped (trailing assistant turns removed from chat rows).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        *,
        fields: PromptFields = PromptFields(),
        apply_chat_template: bool = False,
        max_prompt_len: int | None = None,
        overlong: str = "truncate_left",
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}: accepted values are {OVERLONG_POLICIES}")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise ValueError(f"max_prompt_len={max_prompt_len}: must be >= 1 or None (no limit)")
        single = isinstance(paths, (str, os.PathLike))
        self.paths = [Path(p) for p in ([paths] if single else paths)]
        if not self.paths:
            raise ValueError("PromptDataset needs at least one prompt file")
        self.tokenizer, self.fields = tokenizer, fields
        self.apply_chat_template = apply_chat_template
        self.max_prompt_len, self.overlong = max_prompt_len, overlong
        self._sources = [_open_source(p, fields) for p in self.paths]
        self.stats = dict.fromkeys(("num_rows", "num_kept", "num_truncated", "num_skipped",
                                    "num_tokens", "max_prompt_tokens",
                                    "num_assistant_turns_dropped"), 0)
        self._crc32: int | None = None
        self._build()

    def _build(self) -> None:
        tokens, starts = array("i"), array("q", [0])
        files, lines, locs = array("i"), array("q"), array("q")
        for f, src in enumerate(self._sources):
            for chunk in _chunks(src.rows(), _CHUNK_ROWS):
                wheres = [src.where(line) for line, _, _ in chunk]
                rows = [_parse_row(row, self.fields, w, src.default_id(line))
                        for (line, _, row), w in zip(chunk, wheres)]
                for (line, loc, _), w, ids in zip(chunk, wheres, self._tokenize(rows, wheres)):
                    if not ids:
                        raise ValueError(f"{w}: the prompt tokenizes to no tokens")
                    ids = self._fit(ids)
                    if ids is None:
                        continue
                    tokens.extend(ids)
                    starts.append(len(tokens))
                    files.append(f)
                    lines.append(line)
                    locs.append(loc)
                self.stats["num_rows"] += len(rows)
                self.stats["num_assistant_turns_dropped"] += sum(r.dropped_turns for r in rows)
        self._tokens, self._files = np.frombuffer(tokens, np.int32), np.frombuffer(files, np.int32)
        self._starts, self._lines, self._locs = (np.frombuffer(a, np.int64)
                                                 for a in (starts, lines, locs))
        self.stats.update(num_kept=len(self._files), num_tokens=len(self._tokens))
        where = ", ".join(map(str, self.paths))
        if not len(self._files):
            raise ValueError(f"no prompts left in {where} (stats: {self.stats}); with "
                             f"overlong='skip' raise max_prompt_len (now {self.max_prompt_len})")
        changed = self.stats["num_skipped"] or self.stats["num_truncated"]
        (logger.warning if changed else logger.info)("prompts from %s: %s", where, self.stats)

    def _tokenize(self, rows: list[_Row], wheres: list[str]) -> list[list[int]]:
        tok, out = self.tokenizer, [[] for _ in rows]
        is_chat = [r.messages is not None or self.apply_chat_template for r in rows]
        chat = [k for k, c in enumerate(is_chat) if c]
        plain = [k for k, c in enumerate(is_chat) if not c]
        conversations = [rows[k].messages or [{"role": "user", "content": rows[k].text}]
                         for k in chat]
        encoded = _encode_located(tok.apply_chat_template_batch, tok.apply_chat_template,
                                  conversations, [wheres[k] for k in chat])
        for k, ids in zip(chat, encoded):
            out[k] = ids
        # Plain prompts get the tokenizer's special tokens (an HF tokenizer's own BOS
        # policy; SentencePiece: BOS); chat templates write theirs themselves.
        encoded = _encode_located(partial(tok.encode_batch, add_special_tokens=True),
                                  partial(tok.encode, add_special_tokens=True),
                                  [rows[k].text for k in plain], [wheres[k] for k in plain])
        for k, ids in zip(plain, encoded):
            out[k] = ids
        return out

    def _fit(self, ids: list[int]) -> list[int] | None:
        n, limit = len(ids), self.max_prompt_len
        self.stats["max_prompt_tokens"] = max(self.stats["max_prompt_tokens"], n)
        if limit is None or n <= limit:
            return ids
        if self.overlong == "skip":
            self.stats["num_skipped"] += 1
            return None
        self.stats["num_truncated"] += 1
        return ids[-limit:]  # truncate_left: keep the end, where the question usually is

    def __len__(self) -> int:
        return len(self._files)

    @property
    def lengths(self) -> np.ndarray:
        """[num_prompts] int64 prompt lengths in tokens."""
        return np.diff(self._starts)

    def content_crc32(self) -> int:
        """crc32 of all kept token ids and prompt boundaries: equal data, equal value."""
        if self._crc32 is None:
            self._crc32 = zlib.crc32(self._starts, zlib.crc32(self._tokens))
        return self._crc32

    def token_ids(self, i: int) -> list[int]:
        """Token ids of prompt `i` (memory only, no file read)."""
        self._check_index(i)
        return self._tokens[self._starts[i]:self._starts[i + 1]].tolist()

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records([i])[0]

    def records(self, indices: Sequence[int]) -> list[PromptRecord]:
        """Full records for `indices`, in that order; reads each file once per call."""
        for i in indices:
            self._check_index(i)
        out: list[PromptRecord | None] = [None] * len(indices)
        idx = np.asarray(indices, dtype=np.int64)
        for f in np.unique(self._files[idx]) if len(idx) else []:
            src, pos = self._sources[f], np.nonzero(self._files[idx] == f)[0]
            lines, locs = self._lines[idx[pos]].tolist(), self._locs[idx[pos]].tolist()
            for p, line, row in zip(pos, lines, src.fetch(locs, lines)):
                r = _parse_row(row, self.fields, src.where(line), src.default_id(line))
                out[p] = PromptRecord(r.prompt_id, self.token_ids(int(idx[p])), r.answer,
                                      r.text, r.messages)
        return out  # type: ignore[return-value]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"prompt index {i} outside [0, {len(self)})")


class PromptSampler:
    """This DP rank's prompt indices, one batch of `prompts_per_rank` per `next()`.

    Epoch `e` is the permutation `default_rng([seed, e])` of all prompts (identity when
    `shuffle=False`), cut into `num_prompts // (prompts_per_rank * dp_size)` global
    batches; the remainder of each epoch is dropped so no global batch repeats a prompt.
    Rank `r` takes the `r`-th block of `prompts_per_rank` of each global batch. After the
    last batch of an epoch the next epoch starts. The cursor is (epoch, batch_in_epoch),
    the same on every rank.
    """

    def __init__(self, num_prompts: int, *, prompts_per_rank: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        if prompts_per_rank < 1:
            raise ValueError(f"prompts_per_rank={prompts_per_rank}: must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.num_prompts, self.prompts_per_rank = num_prompts, prompts_per_rank
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.global_batch = prompts_per_rank * dp_size
        self.batches_per_epoch = num_prompts // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_prompts} prompts cannot fill one global batch of "
                             f"prompts_per_rank * dp_size = {self.global_batch}")
        self.epoch = self.batch_in_epoch = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """[num_prompts] prompt order of `epoch` (cached for the current epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            else:
                order = np.arange(self.num_prompts)
            self._perm = (epoch, order)
        return self._perm[1]

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        start = self.batch_in_epoch * self.global_batch + self.dp_rank * self.prompts_per_rank
        batch = self.permutation(self.epoch)[start:start + self.prompts_per_rank].tolist()
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    @property
    def num_batches_done(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def state_dict(self) -> dict[str, int]:
        """The cursor plus what it is only valid with (checked on load); plain ints."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "num_prompts": self.num_prompts, "global_batch": self.global_batch,
                "seed": self.seed, "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`'s cursor. dp_size may differ if the global batch is the same."""
        mine = self.state_dict()
        for key in ("num_prompts", "global_batch", "seed", "shuffle"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"prompt cursor was saved with {key}={state[key]}, this run "
                                 f"has {key}={mine[key]}; the batch order would differ")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"prompt cursor epoch={epoch}, batch_in_epoch={batch} is out of "
                             f"range (batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.batch_in_epoch = epoch, batch


class PromptLoader:
    """`PromptSampler` over a `PromptDataset`: each `next()` is this rank's PromptRecords."""

    def __init__(self, dataset: PromptDataset, *, prompts_per_rank: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.dataset = dataset
        self.sampler = PromptSampler(len(dataset), prompts_per_rank=prompts_per_rank,
                                     dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                                     shuffle=shuffle)

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[PromptRecord]:
        return self.dataset.records(next(self.sampler))

    def state_dict(self) -> dict[str, int]:
        """The sampler's cursor plus the dataset's `content_crc32`; plain ints."""
        return {**self.sampler.state_dict(), "data_crc32": self.dataset.content_crc32()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The same cursor over other prompts (file edited, tokenizer or limits changed)
        # would not continue the saved run: refuse it.
        if int(state["data_crc32"]) != self.dataset.content_crc32():
            raise ValueError("prompt cursor was saved over different prompt data (token ids "
                             "differ: files, tokenizer, template or max_prompt_len changed); "
                             "start a fresh cursor to train on the new data")
        self.sampler.load_state_dict(state)
