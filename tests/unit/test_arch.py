"""ModelArch: HF config parsing per family, and bad input stopping before any process group."""
import pytest

from tip_megatron.models.arch import ModelArch, RopeScaling, padded_vocab_size
from tip_megatron.runtime.parallel import ParallelLayout

transformers = pytest.importorskip("transformers")


def _hf(family, **kw):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    return cls(**base).to_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_from_hf_config_family_traits(family):
    arch = ModelArch.from_hf_config(_hf(family, head_dim=32) if family == "qwen3" else _hf(family))
    assert arch.family == family
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads) == (4, 4, 2)
    assert arch.ffn_hidden_size == 96 and arch.rms_norm_eps == 1e-5
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.qk_norm == (family == "qwen3")
    assert arch.kv_channels == (32 if family == "qwen3" else 16)


def test_llama3_rope_scaling_round_trip():
    cfg = _hf("llama", rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              rope_theta=500000.0)
    arch = ModelArch.from_hf_config(cfg)
    assert arch.rope_scaling == RopeScaling(factor=32.0)
    assert arch.rope_theta == 500000.0
    again = ModelArch.from_hf_config(arch.to_hf_config())
    assert again == arch


@pytest.mark.parametrize("field,value", [("use_sliding_window", True), ("num_experts", 8)])
def test_unsupported_hf_fields_are_named(field, value):
    cfg = _hf("qwen2")
    cfg[field] = value
    with pytest.raises(ValueError, match=field):
        ModelArch.from_hf_config(cfg)


def test_unknown_model_type():
    cfg = _hf("llama")
    cfg["model_type"] = "mistral"
    with pytest.raises(ValueError, match="mistral.*accepted"):
        ModelArch.from_hf_config(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArch.from_hf_config(tmp_path)


def test_unknown_family_name():
    with pytest.raises(ValueError, match="'gpt2'.*accepted"):
        ModelArch(family="gpt2", vocab_size=10, hidden_size=8, num_layers=1,
                  num_attention_heads=2, num_kv_heads=2, ffn_hidden_size=8)


def test_tp_must_divide_heads_and_kv_heads():
    arch = ModelArch.from_hf_config(_hf("llama", num_attention_heads=6, num_key_value_heads=2,
                                        hidden_size=96))
    with pytest.raises(ValueError, match="num_attention_heads=6.*accepted tp"):
        arch.validate_parallel(tp=4, pp=1)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        arch.validate_parallel(tp=3, pp=1)
    arch.validate_parallel(tp=2, pp=1)
    # every tp listed as accepted is accepted (heads 6 allow 3 and 6, kv heads 2 refuse them)
    with pytest.raises(ValueError, match=r"accepted tp: \[1, 2\]$"):
        arch.validate_parallel(tp=6, pp=1)
    for tp in arch.accepted_tp():
        arch.validate_parallel(tp=tp, pp=1)


def test_pp_larger_than_layers():
    arch = ModelArch.from_hf_config(_hf("qwen2"))
    with pytest.raises(ValueError, match="exceed num_layers=4"):
        arch.validate_parallel(tp=1, pp=8)
    with pytest.raises(ValueError, match="not divisible by pp\\*vpp"):
        arch.validate_parallel(tp=1, pp=3)


def test_world_size_not_divisible():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp = 2\\*2"):
        ParallelLayout(tp=2, pp=2).validate(6)
    with pytest.raises(ValueError, match="parallel.tp=0"):
        ParallelLayout(tp=0).validate(1)
    ParallelLayout(tp=2, pp=2).validate(8)
    assert ParallelLayout(tp=2, pp=2).dp(8) == 2


def test_padded_vocab():
    assert padded_vocab_size(151936, 1) == 151936
    assert padded_vocab_size(151665, 2) == 151808
    assert padded_vocab_size(250, 4) == 512
