"""Training checkpoints load strictly: a key the model has and the checkpoint lacks, or the
reverse, stops the load with one message naming the keys (model checkpoints share the
loader, models.checkpoint.load_sharded_strict)."""
import json
from functools import partial

import pytest

from tip_megatron.runtime import parallel, pipeline
from tip_megatron.models import build_model
from tip_megatron.models.lm import lm_batches, lm_forward_step
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.checkpoint import training as ckpt_lib
from tip_megatron.train.optimizer import OptimConfig, build_optimizer, wrap_ddp


def _student(arch, groups):
    ddp = wrap_ddp(build_model(arch, groups), groups, OptimConfig())
    optimizer, scheduler = build_optimizer(ddp, groups, OptimConfig(), total_steps=4)
    return ddp, optimizer, scheduler


def _save_then_load_other(root):
    """Save a Llama's training checkpoint; load it back (control) and into a model that
    has two tensors more (q/k norms) and one fewer (tied output layer). Returns
    {case: error message or the loaded step}."""
    groups = parallel.initialize(parallel.ParallelLayout(), seed=3)
    arch = tiny_arch("llama", num_layers=2)
    ddp, optimizer, scheduler = _student(arch, groups)
    pipeline.forward_backward(partial(lm_forward_step, arch, groups.tp_group), ddp,
                              lm_batches(arch, 1, 2, 8, seed=0), groups, seq_length=8, micro_batch_size=2)
    optimizer.step()  # torch Adam creates its state (and `step`) on the first step
    path = ckpt_lib.save_checkpoint(root, 1, ddp, optimizer, scheduler, groups, extra={},
                                    config_yaml="", arch_json=json.dumps(arch.to_dict()))
    out = {"same": ckpt_lib.load_checkpoint(path, *_student(arch, groups), groups)["step"]}
    other = tiny_arch("qwen3", num_layers=2, head_dim=None, tie_word_embeddings=True)
    ddp, optimizer, scheduler = _student(other, groups)
    for case, opt in (("model", None), ("model+optimizer", optimizer)):
        try:
            ckpt_lib.load_checkpoint(path, ddp, opt, scheduler, groups)
        except ValueError as err:
            out[case] = str(err)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_save_then_load_other, 1, args=(tmp_path_factory.mktemp("ck"),))[0]


def test_matching_checkpoint_loads(results):
    assert results["same"] == 1


@pytest.mark.parametrize("case", ["model", "model+optimizer"])
def test_key_mismatch_names_missing_and_unexpected_keys(results, case):
    message = results[case]
    assert "\n" not in message
    missing, unexpected = message.split("missing (not in the checkpoint): ")[1].split("; unexpected")
    assert "decoder.layers.self_attention.q_layernorm.weight" in missing
    assert "decoder.layers.self_attention.k_layernorm.weight" in missing
    assert "output_layer.weight" in unexpected and "output_layer" not in missing
    assert ("optimizer" in missing) == (case == "model+optimizer")
