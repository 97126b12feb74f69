"""CPU side of `GenerationConfig.cuda_graph` (rollout/cuda_graph.py; the capture itself is
checked in tests/gpu/test_generate_gpu.py): the refusals, and the static-shape decode
step the graph captures (full-length zeroed KV cache written at a tensor column, full-length
mask) run eagerly against the ordinary static engine: same tokens, same log-probs."""
import pytest
import torch

from tip_megatron.rollout.cuda_graph import full_length_mask
from tip_megatron.rollout.generate import GenerationConfig
from tip_megatron.rollout.static import attention_mask as _attention_mask
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [100, 200, 30, 40, 17]]
NEW = 12
STOPS = tuple(range(1, 250, 12))


def _checks(arch):
    from tip_megatron.runtime import parallel
    from tip_megatron.runtime.device import current_device
    from tip_megatron.models import build_model
    from tip_megatron.rollout.generate import generate
    from tip_megatron.rollout.static import generate_static as _generate_static

    g = parallel.initialize(parallel.ParallelLayout(1, 1), seed=7)
    chunks = build_model(arch, g)
    device = current_device()
    out = {}
    for name, kw in {"greedy": dict(temperature=0.0),
                     "spread": dict(temperature=1.0, n=4, stop_ids=STOPS, top_p=0.9)}.items():
        for graph in (False, True):
            config = GenerationConfig(max_new_tokens=NEW, pad_id=0, engine="static", cuda_graph=graph, **kw)
            out[name, graph] = _generate_static(chunks, g, arch, PROMPTS, config, 1, 0, 0, device)
    try:
        generate(chunks, g, arch, PROMPTS, GenerationConfig(max_new_tokens=NEW, engine="static", cuda_graph=True), seed=1)
        out["refused"] = None
    except ValueError as e:
        out["refused"] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_checks, 1, args=(tiny_arch("llama"),))[0]


@pytest.mark.parametrize("name", ["greedy", "spread"])
def test_static_shape_step_equals_the_eager_engine(results, name):
    eager, static = results[name, False], results[name, True]
    assert torch.equal(eager.token_ids, static.token_ids)
    assert torch.equal(eager.response_lengths, static.response_lengths)
    torch.testing.assert_close(eager.logprobs, static.logprobs, atol=1e-5, rtol=0)
    if name == "spread":
        assert eager.stopped.any() and eager.response_lengths.min() < eager.response_lengths.max()


def test_cuda_graph_is_refused_off_cuda(results):
    message = results["refused"]
    assert message is not None and "cuda_graph=True" in message and "CUDA device" in message
    assert "\n" not in message


@pytest.mark.parametrize("kw", [dict(), dict(engine="static", use_kv_cache=False)])
def test_cuda_graph_needs_the_static_cached_engine(kw):
    with pytest.raises(ValueError, match="cuda_graph=True needs engine='static'"):
        GenerationConfig(cuda_graph=True, **kw)


def test_full_length_mask_masks_the_unwritten_columns():
    pads, start, max_len = torch.tensor([2, 0]), 5, 9
    mask = full_length_mask(_attention_mask(pads, start, 1), max_len)
    assert mask.shape == (2, 1, 1, max_len)
    keys = torch.arange(max_len)
    expected = (keys[None, :] <= start) & (keys[None, :] >= pads[:, None])
    assert torch.equal(mask[:, 0, 0], expected)
