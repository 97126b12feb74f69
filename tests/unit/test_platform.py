"""The CPU redirects of megatron-core's CUDA assumptions (tip_megatron.runtime.megatron_compat).

Each redirect has two checks: the assumption is still in megatron's source (if megatron
changes underneath, this fails and names the redirect to revisit), and megatron's own
code now runs on the CPU through the redirect.
"""
import importlib
import inspect

import pytest
import torch

from tip_megatron.runtime import megatron_compat
from tip_megatron.runtime.device import Device, default_backend
from tip_megatron.runtime.megatron_compat import MEGATRON_CUDA_ASSUMPTIONS, apply_cpu_compat
from tip_megatron.runtime.optional import optional_deps, require

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU redirects apply only without CUDA")

#: redirect name -> (megatron module, qualified object, source fragment it relies on)
_SITES = {
    "rng_tracker": [("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add",
                     "torch.cuda.get_rng_state()")],
    "current_device": [
        ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.__init__",
         "torch.cuda.current_device()"),
        ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
         "device=torch.cuda.current_device()"),
        ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate_shapes",
         "device=torch.cuda.current_device()"),
    ],
    "device_cuda_literal": [
        ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining",
         'device="cuda"'),
        ("megatron.core.transformer.utils", "get_default_causal_mask", 'device="cuda"'),
        ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "device='cuda'"),
        ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__", "device='cuda'"),
    ],
    "streams": [("megatron.core.distributed.param_and_grad_buffer",
                 "_ParamAndGradBucketGroup.start_grad_sync", "torch.cuda.current_stream()"),
                ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                 "FileSystemWriterAsync.preload_tensors", "torch.cuda.synchronize()")],
    "tensor_cuda_method": [("megatron.core.models.common.language_module.language_module",
                            "LanguageModule.setup_embeddings_and_output_layer", ".cuda()"),
                           ("megatron.core.optimizer.distrib_optimizer",
                            "DistributedOptimizer.get_parameter_state_dp_zero", ".cuda()")],
    "type_strings": [
        ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "'torch.cuda.FloatTensor'"),
        ("megatron.core.optimizer.distrib_optimizer",
         "DistributedOptimizer._build_model_and_main_param_groups", "'torch.cuda.FloatTensor'"),
    ],
}


def _source(module_name, qualname):
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    return inspect.getsource(obj)


def test_every_redirect_has_a_site_check():
    assert set(_SITES) == set(MEGATRON_CUDA_ASSUMPTIONS)


@pytest.mark.parametrize("redirect,module,qualname,fragment",
                         [(r, *site) for r, sites in _SITES.items() for site in sites])
def test_megatron_still_assumes_cuda_here(redirect, module, qualname, fragment):
    assert fragment in _source(module, qualname), (
        f"megatron-core changed {module}.{qualname}: the '{redirect}' redirect in "
        "tip_megatron/runtime/megatron_compat.py may be stale or unnecessary"
    )


@pytest.fixture(scope="module")
def compat():
    assert apply_cpu_compat() is True
    return megatron_compat


def test_idempotent_and_torch_untouched(compat):
    from megatron.core.optimizer import clip_grads

    fn = clip_grads.clip_grad_by_total_norm_fp32
    assert compat.apply_cpu_compat() is True
    assert clip_grads.clip_grad_by_total_norm_fp32 is fn
    assert inspect.unwrap(fn).__name__ == "clip_grad_by_total_norm_fp32"
    assert not getattr(fn.__wrapped__, "_tip_cpu_wrapped", False)  # wrapped once, not twice
    # torch itself is never patched: only megatron modules see the CPU view.
    assert torch.cuda.current_device is importlib.import_module("torch.cuda").current_device
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_rng_tracker_on_cpu(compat):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0,
                                                    force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
    with tracker.fork():
        b = torch.randn(4)
    assert not torch.equal(a, b), "the forked stream must advance"
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0,
                                                    force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.randn(4), a), "same seed, same stream"


def test_current_device_allocations_on_cpu(compat):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(8)
    assert emb.device.type == "cpu" and emb.shape[0] == 8


def test_device_cuda_literal_on_cpu(compat):
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))


def test_streams_are_no_ops(compat):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.distributed import param_and_grad_buffer as pgb

    with pytest.raises((AssertionError, RuntimeError)):  # what megatron would hit unredirected
        torch.cuda.current_stream()
    stream = pgb.torch.cuda.current_stream()
    with pgb.torch.cuda.stream(stream):
        stream.wait_stream(stream)
    # megatron's own async-checkpoint preload ends with torch.cuda.synchronize()
    tensor = torch.arange(6.0)
    ((name, key, (data, items)),) = FileSystemWriterAsync.preload_tensors(
        [("f.distcp", "k", (b"", [("item", tensor)]))], non_blocking=True)
    assert (name, key, data) == ("f.distcp", "k", b"")
    assert items[0][0] == "item" and torch.equal(items[0][1], tensor)


def test_clip_grads_type_string_and_device_literal(compat):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=10.0)
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0 * 1.0 / (10.0 + 1e-6)))
    # The type-name view ends with the call.
    assert p.grad.type() == "torch.FloatTensor"


def test_cpu_compat_not_applied_with_cuda(monkeypatch):
    monkeypatch.setattr(megatron_compat, "default_backend", lambda: Device("cuda", "nccl"))
    assert apply_cpu_compat() is False


def test_backend_choice_and_env_override(monkeypatch):
    assert default_backend() == Device("cpu", "gloo")
    monkeypatch.setenv("TIP_MEGATRON_DEVICE", "tpu")
    with pytest.raises(ValueError, match="TIP_MEGATRON_DEVICE='tpu'.*'cpu' and 'cuda'"):
        default_backend()


def test_optional_dependency_errors_name_the_package():
    deps = optional_deps()
    assert deps.te_usable is False and deps.apex is False
    with pytest.raises(RuntimeError, match="Transformer Engine layer spec needs transformer_engine"):
        require("transformer_engine", "the Transformer Engine layer spec")
    with pytest.raises(RuntimeError, match="never `pip install apex`"):
        require("apex", "fused Adam")
