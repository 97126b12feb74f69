"""Sequence parallelism through the Python API: a micro-batch length tp does not divide is
one line naming the length, tp and the fix (it stopped in megatron's scatter with a bare
assertion); the trainer pads (tests/distributed/test_sequence_parallel.py runs it)."""
import pytest
import torch

from tip_megatron.distill.spec import DistillSpec, LossConfig
from tip_megatron.distill.step import Microbatch, teacher_hidden_states, train_pass
from tip_megatron.models import build_model
from tip_megatron.runtime import parallel
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.tip import SelectionConfig

ARCH = tiny_arch("llama")


def _microbatch(rows: int, seq: int) -> Microbatch:
    ids = torch.randint(0, ARCH.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(rows, seq, dtype=torch.bool)
    target[:, 3:seq - 1] = True
    return Microbatch(ids, torch.arange(seq).expand(rows, seq).contiguous(), target, torch.arange(rows))


def _odd_lengths() -> list[str]:
    g = parallel.initialize(parallel.ParallelLayout(tp=2, sequence_parallel=True), seed=0)
    model = build_model(ARCH, g)
    spec = DistillSpec(SelectionConfig(rule="soft_or", rho=0.5), LossConfig(), ARCH.vocab_size, g.tp_group)
    errors = []
    for call in (lambda mbs, shape: teacher_hidden_states(model, g, mbs, **shape),
                 lambda mbs, shape: train_pass(model, g, mbs, [None], spec, **shape)):
        with pytest.raises(ValueError) as err:
            call([_microbatch(2, 11)], dict(seq_length=11, micro_batch_size=2))
        errors.append(str(err.value))
    return errors


def test_odd_length_under_sequence_parallelism_is_one_line():
    for errors in run_distributed(_odd_lengths, world_size=2, timeout_s=300):
        assert errors == [
            "sequence length 11: parallel.sequence_parallel=True with tp=2 needs a multiple of 2; "
            "right-pad the micro-batches (target_mask False on the padding) as the trainer does "
            "(train.batches.update_microbatches(seq_multiple=tp))"] * 2
