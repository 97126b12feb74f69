"""GPU tier: Transformer Engine spec build and a bf16 forward/backward (skipped without CUDA).

Run by tools/gpu_check.sh on a lent GPU machine. The TE test additionally needs
transformer_engine importable (NGC container); the local-spec bf16 test needs only CUDA.
"""
import pytest
import torch

from tip_megatron.runtime import parallel
from tip_megatron.models import BuildOptions, build_model
from tip_megatron.models.lm import lm_batches
from tip_megatron.models.state import gather_full_state_dict, load_full_state_dict
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch

pytestmark = pytest.mark.gpu


def _bf16_fwd_bwd(spec, family):
    from tip_megatron.models.lm import lm_loss

    arch = tiny_arch(family)
    g = parallel.initialize(parallel.ParallelLayout(tp=1))
    (model,) = build_model(arch, g, BuildOptions(spec=spec))
    batch = {k: v.cuda() for k, v in lm_batches(arch, 1, 4, 32, seed=0)[0].items()}
    logits = model(batch["input_ids"], batch["position_ids"], None)
    loss_sum, num, _ = lm_loss(logits, batch["labels"], batch["loss_mask"],
                               vocab_size=arch.vocab_size, tp_group=g.tp_group)
    (loss_sum / num).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return (
        next(model.parameters()).dtype,
        float(loss_sum / num),
        all(torch.isfinite(gr).all().item() for gr in grads),
        len(grads),
    )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_local_spec_bf16_forward_backward(family):
    dtype, loss, finite, num_grads = run_distributed(_bf16_fwd_bwd, 1, args=("local", family), start_method="spawn")[0]
    assert dtype == torch.bfloat16
    assert abs(loss - torch.log(torch.tensor(250.0)).item()) < 1.0  # ~uniform at init
    assert finite and num_grads > 0


def test_te_spec_bf16_forward_backward():
    pytest.importorskip("transformer_engine.pytorch")
    dtype, loss, finite, num_grads = run_distributed(_bf16_fwd_bwd, 1, args=("te", "qwen3"), start_method="spawn")[0]
    assert dtype == torch.bfloat16 and finite and num_grads > 0


def _tp2_cuda_parity(full):
    from functools import partial

    from tip_megatron.runtime import pipeline
    from tip_megatron.models.lm import lm_forward_step
    from tip_megatron.train.optimizer import OptimConfig, wrap_ddp

    arch = tiny_arch("llama")
    g = parallel.initialize(parallel.ParallelLayout(tp=2))
    chunks = build_model(arch, g, BuildOptions(params_dtype=torch.float32))
    if full is not None:
        load_full_state_dict(chunks, full, g, arch)
    ddp = wrap_ddp(chunks, g, OptimConfig(use_distributed_optimizer=False))
    mbs = [{k: v.cuda() for k, v in b.items()} for b in lm_batches(arch, 2, 2, 16, seed=1)]
    reports = pipeline.forward_backward(partial(lm_forward_step, arch, g.tp_group), ddp, mbs, g,
                                        seq_length=16, micro_batch_size=2)
    return gather_full_state_dict(ddp, g, arch), torch.stack([r["lm_loss"] for r in reports]).sum(0).cpu()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL TP=2")
def test_nccl_tp2_runs():
    results = run_distributed(_tp2_cuda_parity, 2, args=(None,), start_method="spawn")
    assert torch.isfinite(results[0][1]).all()
