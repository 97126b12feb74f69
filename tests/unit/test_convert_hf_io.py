"""HF checkpoint reading/writing and the checks that run before any rank starts."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tip_megatron.checkpoint.hf.exporter import hf_config
from tip_megatron.checkpoint.hf.hf_io import (
    HFCheckpoint, ShardedSafetensorsWriter, hf_tensor_order, parse_size, plan_shards,
)
from tip_megatron.checkpoint.hf.importer import ImportOptions, LazyFullState, check_import, resolve_dtype
from tip_megatron.checkpoint.hf.mapping import expected_hf_shapes
from tip_megatron.testing.hf_models import LLAMA3_ROPE, tiny_hf_model
from tip_megatron.checkpoint import model as mckpt
from tip_megatron.testing.models import tiny_arch


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """qwen2 saved as one file, and as shards with an index."""
    root = tmp_path_factory.mktemp("hf")
    model = tiny_hf_model("qwen2")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reader_is_lazy_and_complete(hf_dirs, layout):
    root, state = hf_dirs
    if layout == "sharded":
        assert (root / layout / "model.safetensors.index.json").is_file()
    ckpt = HFCheckpoint(root / layout)
    ckpt.validate()
    assert set(ckpt.names()) == set(state)
    assert ckpt.shape("model.layers.0.self_attn.k_proj.bias") == (16,)
    assert all(torch.equal(ckpt.get(name), tensor) for name, tensor in state.items())
    lazy = LazyFullState(ckpt)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in lazy and "nope" not in lazy
    assert lazy["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((8 + 2 * 2) * 8, 64)


@pytest.mark.parametrize("edit,match", [
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(use_sliding_window=True), "use_sliding_window=True is not supported"),
    (dict(num_experts=8), "num_experts=8 is not supported"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
])
def test_unsupported_configs_are_refused(hf_dirs, tmp_path, edit, match):
    path = _copy(hf_dirs[0] / "single", tmp_path / "m")
    _edit_config(path, **edit)
    with pytest.raises(ValueError, match=match):
        HFCheckpoint(path)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*layers.1.mlp.up_proj"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}),
     "unexpected tensor.*layers.9.mlp.up_proj"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}),
     r"'model.layers.0.self_attn.k_proj.weight' has shape \[8, 64\].*\[16, 64\]"),
])
def test_bad_tensors_are_named(hf_dirs, tmp_path, edit, match):
    path = _copy(hf_dirs[0] / "single", tmp_path / "m")
    _edit_tensors(path, edit)
    with pytest.raises(ValueError, match=match):
        HFCheckpoint(path).validate()


def test_index_pointing_at_missing_file(hf_dirs, tmp_path):
    path = _copy(hf_dirs[0] / "sharded", tmp_path / "m")
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="listed in model.safetensors.index.json"):
        HFCheckpoint(path)


def test_pickle_needs_opt_in_and_loads_weights_only(hf_dirs, tmp_path):
    root, state = hf_dirs
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(root / "single" / "config.json", path)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle checkpoint.*allow_pickle"):
        HFCheckpoint(path)
    ckpt = HFCheckpoint(path, allow_pickle=True)
    ckpt.validate()
    assert torch.equal(ckpt.get("model.norm.weight"), state["model.norm.weight"])
    torch.save({**state, "evil": _NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only"):
        HFCheckpoint(path, allow_pickle=True)


class _NotATensor:
    pass


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
    model = tiny_hf_model("llama", tie_word_embeddings=True, num_hidden_layers=1)
    model.save_pretrained(tmp_path / "m")
    emb = model.model.embed_tokens.weight.detach().clone()
    _edit_tensors(tmp_path / "m", lambda t: t.update({"lm_head.weight": emb.clone()}))
    HFCheckpoint(tmp_path / "m").validate()  # equal to the embedding: tolerated
    _edit_tensors(tmp_path / "m", lambda t: t.update({"lm_head.weight": emb + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        HFCheckpoint(tmp_path / "m").validate()


def test_import_checks_run_before_any_rank(hf_dirs, tmp_path):
    src = hf_dirs[0] / "single"
    with pytest.raises(ValueError, match="does not divide num_kv_heads=2"):
        check_import(src, tmp_path / "out", ImportOptions(tp=4))
    with pytest.raises(ValueError, match="pipeline stages"):
        check_import(src, tmp_path / "out", ImportOptions(pp=8))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        check_import(src, tmp_path / "out", ImportOptions(dtype="int8"))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        check_import(src, tmp_path / "out", ImportOptions())
    rope = dict(LLAMA3_ROPE["rope_scaling"], low_freq_factor=2.0)  # megatron fixes it at 1
    tiny_hf_model("llama", num_hidden_layers=1, rope_scaling=rope).save_pretrained(tmp_path / "rope")
    with pytest.raises(ValueError, match="low_freq_factor"):
        check_import(tmp_path / "rope", tmp_path / "out2", ImportOptions())
    assert resolve_dtype(None, {"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert resolve_dtype("float16", {"dtype": "bfloat16"}) == torch.float16
    assert resolve_dtype(None, {}) == torch.float32


def test_sharded_writer_round_trips_through_the_reader(hf_dirs, tmp_path):
    root, state = hf_dirs
    ckpt = HFCheckpoint(root / "single")
    arch = ckpt.arch
    order = hf_tensor_order(arch)
    assert set(order) == set(expected_hf_shapes(arch)) == set(state)
    plan = plan_shards([(n, state[n].numel() * 4) for n in order], parse_size("40KB"))
    assert len(plan) > 1 and [n for shard in plan for n in shard] == order
    shutil.copy(root / "single" / "config.json", tmp_path)
    writer = ShardedSafetensorsWriter(tmp_path, plan)
    for name in order:
        writer.add(name, state[name])
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    back = HFCheckpoint(tmp_path)
    assert all(torch.equal(back.get(n), t) for n, t in state.items())


def test_size_parsing_and_planning():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size(7) == 7
    assert plan_shards([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]


def test_model_checkpoint_metadata_helpers(tmp_path):
    with pytest.raises(ValueError, match="neither a tip_megatron model checkpoint"):
        mckpt.read_arch(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other", "format_version": 1}))
    with pytest.raises(ValueError, match="format 'other'"):
        mckpt.read_meta(tmp_path)
    a, b = tiny_arch("qwen3"), tiny_arch("qwen3", num_layers=2, hidden_size=32)
    assert mckpt.arch_differences(a, a) == []
    assert mckpt.arch_differences(a, b) == ["hidden_size: 64 != 32", "num_layers: 4 != 2"]
    assert mckpt.stored_key("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert mckpt.stored_key("decoder.layers.0.mlp.linear_fc1.weight") == (
        "decoder.layers.mlp.linear_fc1.weight", 0)
    assert mckpt.stored_key("output_layer.weight") == ("output_layer.weight", None)


def test_export_config_carries_fields(hf_dirs):
    arch = HFCheckpoint(hf_dirs[0] / "single").arch
    cfg = hf_config(arch, "bfloat16")
    assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == "qwen2"
    assert cfg["use_sliding_window"] is False and cfg["num_key_value_heads"] == 2


def test_cli_registers_convert():
    from tip_megatron.apps.cli import build_parser

    args = build_parser().parse_args(["convert", "hf-to-mcore", "--hf", "a", "--out", "b", "--tp", "2"])
    assert (args.tp, args.pp, args.dtype, args.allow_pickle) == (2, 1, None, False) and callable(args.func)
    args = build_parser().parse_args(["convert", "mcore-to-hf", "--ckpt", "a", "--out", "b"])
    assert args.max_shard_size == "5GB" and callable(args.func)
