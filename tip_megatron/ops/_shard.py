"""Where a vocab shard sits in the global vocabulary, and the TP collectives the ops use.

Shapes: [tokens, V/tp] = one rank's logit shard; [tokens] = one value per token.

Megatron splits the (padded) vocabulary evenly: rank r of a TP group of size `tp` holds
global columns [r * V/tp, (r + 1) * V/tp). Megatron pads the vocabulary to a multiple of
`make_vocab_size_divisible_by * tp`, and the padding is a suffix of the global vocabulary,
so on every rank the true-vocab columns are a prefix of the shard: `shard[:, :valid_width]`.
Slicing that prefix is the same as masking the padding to -inf before the softmax (zero
probability, zero gradient), without a masked copy of the shard.

`tp_group=None` means "not sharded" (TP = 1, no collectives); any other value is a
`torch.distributed` process group and is never replaced by a global default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from tip_megatron.runtime.groups import group_rank, group_size

#: Default work per chunk: tokens per chunk = max(1, CHUNK_ELEMENTS // shard width).
#: On CPU, 2^20 elements (4 MiB per fp32 buffer) keeps a chunk in cache across the several
#: elementwise passes over it (measured ~1.3x faster than 16 MiB chunks at V/tp = 75,968);
#: on accelerators 2^25 (128 MiB) keeps kernels long enough to hide launch latency.
CHUNK_ELEMENTS_CPU = 1 << 20
CHUNK_ELEMENTS_ACCEL = 1 << 25


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary."""

    tp_rank: int
    tp_size: int
    shard_width: int
    """Columns of the local shard (padded vocab / tp)."""
    vocab_size: int
    """The TRUE vocabulary size: global columns >= this are padding."""

    @property
    def start(self) -> int:
        """Global index of the shard's first column (megatron's vocab_start_index)."""
        return self.tp_rank * self.shard_width

    @property
    def valid_width(self) -> int:
        """Leading shard columns inside the true vocabulary (0 when the shard is all padding)."""
        return max(0, min(self.shard_width, self.vocab_size - self.start))


def vocab_shard(shard_width: int, tp_group: Any, vocab_size: int) -> VocabShard:
    """Locate this rank's shard; ValueError when the shards cannot hold `vocab_size`."""
    tp_size = group_size(tp_group)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= 2 (the TRUE vocab size)")
    if shard_width * tp_size < vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the sharded width {shard_width} * tp {tp_size} = "
            f"{shard_width * tp_size}; pass the true (unpadded) vocabulary size"
        )
    return VocabShard(group_rank(tp_group), tp_size, shard_width, vocab_size)


def check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name} must be [tokens, V/tp] (2-D); got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {logits.dtype}")


def check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Student and teacher shards must cover the same global columns and tokens."""
    check_logits("student_logits", student)
    check_logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student shard width {student.shape[-1]} != teacher shard width "
            f"{teacher.shape[-1]}: build both output layers with the same padded vocabulary "
            "(the true vocabularies are compared by check_vocab_compat)"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student has {student.shape[0]} tokens but teacher has {teacher.shape[0]}"
        )


def chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS_CPU if device.type == "cpu" else CHUNK_ELEMENTS_ACCEL


def chunk_tokens(shard_width: int, chunk_size: Optional[int], device: torch.device) -> int:
    """Tokens per chunk: `chunk_size` when given, else the per-device element budget."""
    if chunk_size is None:
        return max(1, chunk_elements(device) // max(1, shard_width))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be None or an integer >= 1")
    return chunk_size


class Workspace:
    """`count` reusable [rows, width] compute-dtype buffers for the chunk loops.

    Every elementwise step of a chunk writes into these (out= / in-place), so the loop
    allocates nothing per chunk: on CPU a fresh tensor above glibc's mmap threshold (up to
    32 MiB) costs page faults that take longer than the arithmetic, and a reused buffer
    stays in cache; on GPU it spares the caching allocator.
    """

    def __init__(self, rows: int, width: int, like: torch.Tensor, count: int) -> None:
        dtype, device = compute_dtype(like), like.device
        self.buffers = [torch.empty((rows, width), dtype=dtype, device=device) for _ in range(count)]

    def views(self, rows: int) -> list[torch.Tensor]:
        return [b[:rows] for b in self.buffers]


def shift_into(out: torch.Tensor, logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out = logits - shift[:, None], computed in out's dtype (bf16 - fp32 promotes)."""
    return torch.sub(logits, shift[:, None], out=out)


def diff_into(out: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """out = student - teacher in out's (compute) dtype; bf16 operands are upcast first
    (bf16 - bf16 would round the difference to bf16)."""
    if student.dtype == out.dtype:
        return torch.sub(student, teacher, out=out)
    return out.copy_(student).sub_(teacher)


def token_chunks(num_tokens: int, chunk: int) -> Iterator[slice]:
    for begin in range(0, num_tokens, chunk):
        yield slice(begin, min(begin + chunk, num_tokens))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 for fp64 inputs (gradcheck, references)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def local_max(valid_logits: torch.Tensor) -> torch.Tensor:
    """[tokens] max over the true-vocab columns `[tokens, valid_width]`, in compute dtype.

    amax in the input dtype is exact (max never rounds), so no fp32 copy of the shard.
    An all-padding shard (valid_width == 0) contributes -inf, the identity of MAX.
    """
    dtype = compute_dtype(valid_logits)
    if valid_logits.shape[-1] == 0:
        rows = valid_logits.shape[0]
        return torch.full((rows,), float("-inf"), dtype=dtype, device=valid_logits.device)
    return valid_logits.amax(dim=-1).to(dtype)


def finite_max(global_max: torch.Tensor) -> torch.Tensor:
    """Replace the max of an all -inf row by 0 so that `x - max` stays -inf, not NaN.

    Such a row has no probability mass at all; callers require at least one finite logit
    in the true vocabulary per row, this only keeps NaN from spreading to other rows.
    """
    return torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))


def all_reduce_(tensor: torch.Tensor, op: Any, tp_group: Any) -> torch.Tensor:
    """In-place all-reduce over the TP group (no-op when unsharded); returns `tensor`."""
    if group_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor


def all_gather(tensor: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """[tp, *tensor.shape]: every rank's `tensor`, stacked in TP-rank (= vocab) order."""
    if group_size(tp_group) == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(group_size(tp_group))]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.stack(parts)


SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX
