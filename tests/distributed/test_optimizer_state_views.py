"""The optimizer state of a training checkpoint at one DP rank is made of views of the live
state (checkpoint/optimizer_state.py), equal to megatron's own `fully_reshardable` state
dict: same keys, shapes, offsets, replica ids, order and values, no copy of the state. A
save through the views loads back (into a fresh optimizer, through megatron's own copy
path too) to the exact state; with DP = 2 megatron's path is used unchanged.
"""
import json
from functools import partial

import pytest
import torch

from tip_megatron.checkpoint import training as ckpt_lib
from tip_megatron.checkpoint.optimizer_state import OPTIM_METADATA, optimizer_sharded_state
from tip_megatron.models import build_model
from tip_megatron.models.lm import lm_batches, lm_forward_step
from tip_megatron.runtime import parallel, pipeline
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch
from tip_megatron.train.optimizer import OptimConfig, build_optimizer, wrap_ddp


def _student(arch, groups, seed):
    torch.manual_seed(seed)
    ddp = wrap_ddp(build_model(arch, groups), groups, OptimConfig())
    optimizer, scheduler = build_optimizer(ddp, groups, OptimConfig(lr=1e-2), total_steps=4)
    return ddp, optimizer, scheduler


def _flat_tensors(state: dict) -> dict:
    out = {}
    for idx, entry in state["param_state"].items():
        for key, sh in entry.items():
            out[(idx, key)] = sh
    return out


def _meta(sh) -> tuple:
    """What a save writes of a ShardedTensor (or factory: e.g. SwiGLU's split fc1) but its data."""
    fields = ("key", "global_shape", "global_offset", "axis_fragmentations", "replica_id", "dtype")
    return (type(sh).__name__, tuple(sh.data.shape), *(getattr(sh, f, None) for f in fields))


def _state_after_step(arch, groups):
    ddp, optimizer, scheduler = _student(arch, groups, seed=0)
    pipeline.forward_backward(partial(lm_forward_step, arch, groups.tp_group), ddp,
                              lm_batches(arch, 1, 2, 8, seed=0), groups, seq_length=8, micro_batch_size=2)
    optimizer.step()
    return ddp, optimizer, scheduler


def _compare(tp, root):
    """This rank's comparison of the two state dicts, and the round trip's exactness."""
    groups = parallel.initialize(parallel.ParallelLayout(tp=tp), seed=3)
    arch = tiny_arch("qwen3", num_layers=2)
    ddp, optimizer, scheduler = _state_after_step(arch, groups)
    model_sd = ckpt_lib.sharded_state_dict(list(ddp))
    ours = _flat_tensors(optimizer_sharded_state(optimizer, model_sd, is_loading=False))
    theirs = _flat_tensors(optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIM_METADATA))
    report = dict(same_keys=list(ours) == list(theirs), dp=groups.dp_size)
    report["same_meta"] = all(_meta(a) == _meta(b) for a, b in zip(ours.values(), theirs.values()))
    report["same_values"] = all(torch.equal(a.data, b.data) for a, b in zip(ours.values(), theirs.values()))
    live = {id(t.untyped_storage()) for g in optimizer.param_groups for p in g["params"]
            for t in [p, *[v for v in optimizer.chained_optimizers[0].optimizer.state[p].values()
                           if torch.is_tensor(v) and v.dim() > 0]]}
    report["all_views"] = all(id(sh.data.untyped_storage()) in live for sh in ours.values())
    # round trip: save (views), load into a fresh optimizer, compare every tensor
    path = ckpt_lib.save_checkpoint(root, 1, ddp, optimizer, scheduler, groups, extra={},
                                    config_yaml="", arch_json=json.dumps(arch.to_dict()))
    ddp2, optimizer2, scheduler2 = _student(arch, groups, seed=1)
    ckpt_lib.load_checkpoint(path, ddp2, optimizer2, scheduler2, groups)
    back = _flat_tensors(optimizer_sharded_state(optimizer2, ckpt_lib.sharded_state_dict(list(ddp2)), False))
    report["round_trip_exact"] = all(torch.equal(back[k].data, theirs[k].data) for k in theirs)
    report["round_trip_states"] = len(back) == len(theirs)
    return report


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2_dp1_views", "tp1_dp2_megatron"])
def test_views_equal_megatron_state_and_round_trip(tp, tmp_path):
    reports = run_distributed(_compare, 2, args=(tp, tmp_path / "ck"))
    for r in reports:
        assert r["dp"] == 2 // tp
        assert r["same_keys"] and r["same_meta"] and r["same_values"], r
        assert r["round_trip_exact"] and r["round_trip_states"], r
        assert r["all_views"] == (tp == 2), r  # DP = 2: megatron's gathered copies
