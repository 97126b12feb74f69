"""HF -> Megatron -> HF conversion, checked against transformers.

Tiny random HF models of every family (GQA, tied and untied, qwen2 qkv bias, qwen3 q/k
norm and explicit head_dim, llama3 rope scaling) are converted at (TP, PP) in
{(1,1), (2,1), (1,2), (2,2)}; at each layout the converted checkpoint is loaded into a
freshly built model and its logits must equal transformers' (fp32, max abs diff 1e-4).
Each layout's launch also loads the checkpoint written by the previous layout (TP 1 -> 2,
2 -> 1, 1 -> 2 with PP changing too; vocab 300 pads to 384 at TP=1 and 512 at TP=2, so the
padded sizes differ), and PP2 x VPP2 chunks load and save too. The TP2 x PP2 checkpoints
are exported back to HF and must reproduce every tensor bit for bit. One launch per layout runs every model (launches cost imports).
"""
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tip_megatron.runtime import parallel, pipeline
from tip_megatron.checkpoint.hf import ImportOptions, mcore_to_hf
from tip_megatron.checkpoint.hf.hf_io import HFCheckpoint
from tip_megatron.checkpoint.hf.importer import LazyFullState, import_rank, preload_for_fork
from tip_megatron.testing.hf_models import LLAMA3_ROPE, hf_logits, tiny_hf_model
from tip_megatron.models import BuildOptions, ModelArch, build_model
from tip_megatron.checkpoint.model import (
    load_model_checkpoint, read_meta, save_model_checkpoint, stored_key, stored_metadata,
)
from tip_megatron.models.state import gather_full_state_dict
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.models import tiny_arch

BATCH, SEQ, TOL = 2, 32, 1e-4
VARIANTS = {
    "llama_gqa_rope": ("llama", dict(LLAMA3_ROPE)),
    "llama_tied_mha": ("llama", dict(num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict()),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # each launch reloads the previous one's output


def _ckpt(workdir: Path, name: str, layout) -> Path:
    return workdir / f"{name}_tp{layout[0]}pp{layout[1]}"


def _forward_step(arch, tp_group, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["input_ids"], batch["position_ids"], None)
    return output, partial(_gather_logits, arch, tp_group)


def _gather_logits(arch, tp_group, logits):
    """Test-side gather of vocab-parallel logits [b, s, V/tp] -> [b, s, vocab_size]."""
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    full = torch.cat(parts, dim=-1)[..., : arch.vocab_size].detach().clone()
    return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": full}


def _logits(arch, groups, ckpt, input_ids, chunks=None):
    if chunks is None:
        chunks = build_model(arch, groups, BuildOptions(init_weights=False))
        load_model_checkpoint(chunks, groups, ckpt, expect_arch=arch)
    # one sequence per micro-batch: the interleaved schedule wants micro-batches >= pp
    mbs = [dict(input_ids=ids[None], position_ids=torch.arange(SEQ)[None]) for ids in input_ids]
    with torch.no_grad():
        reports = pipeline.forward_backward(partial(_forward_step, arch, groups.tp_group), chunks,
                                            mbs, groups, seq_length=SEQ, micro_batch_size=1,
                                            forward_only=True)
    if not reports or groups.tp_rank != 0:
        return None
    return torch.cat([r["logits"] for r in reports])


def _convert_and_run(layout, workdir, previous, input_ids):
    """One rank: convert every variant at `layout`, run the converted and the previous
    layout's checkpoints. Returns {name: logits} on the reporting rank."""
    tp, pp = layout
    groups = parallel.initialize(parallel.ParallelLayout(tp=tp, pp=pp))
    out = {}
    for name in VARIANTS:
        hf_dir = workdir / "hf" / name
        arch = ModelArch.from_hf_config(hf_dir)
        ckpt = _ckpt(workdir, name, layout)
        import_rank(hf_dir, ckpt, ImportOptions(tp=tp, pp=pp), groups=groups)
        out[name] = _logits(arch, groups, ckpt, input_ids)
        if previous is not None:
            out[f"{name}<-{previous}"] = _logits(arch, groups, _ckpt(workdir, name, previous), input_ids)
    if layout == (1, 1):
        out["bf16"] = _bf16_import(workdir, groups)
        out["errors"] = _checkpoint_errors(workdir, groups)
    if layout == (1, 2):
        out.update(_virtual_stages(workdir, layout, input_ids))
    if layout == (2, 2):
        arch = ModelArch.from_hf_config(workdir / "hf" / "qwen3")
        out["qwen3<-vpp"] = _logits(arch, groups, workdir / "qwen3_vpp", input_ids)
    return out


def _checkpoint_errors(workdir, groups):
    """Loading into another architecture, refusing to overwrite, and a save that fails
    half way leaving the existing checkpoint intact. Returns {case: message}."""
    import tip_megatron.checkpoint.model as mckpt

    ckpt = _ckpt(workdir, "qwen3", (1, 1))
    arch = ModelArch.from_hf_config(workdir / "hf" / "qwen3")
    errors = {}
    other = build_model(tiny_arch("qwen3", num_layers=2, vocab_size=300), groups,
                        BuildOptions(init_weights=False))
    for case, call in {
        "model": lambda: load_model_checkpoint(other, groups, ckpt),
        "expect": lambda: load_model_checkpoint(other, groups, ckpt, expect_arch=tiny_arch("qwen3")),
        "exists": lambda: save_model_checkpoint(other, groups, arch, ckpt),
    }.items():
        try:
            call()
        except (ValueError, FileExistsError) as err:
            errors[case] = str(err)

    class _Failing:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    real = mckpt._dist_checkpointing
    mckpt._dist_checkpointing = lambda: _Failing()
    try:
        save_model_checkpoint(other, groups, tiny_arch("qwen3", num_layers=2), ckpt, overwrite=True)
    except OSError as err:
        errors["failed_save"] = str(err)
    finally:
        mckpt._dist_checkpointing = real
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    errors["intact"] = load_model_checkpoint(chunks, groups, ckpt) == arch
    return errors


def _virtual_stages(workdir, layout, input_ids):
    """PP=2 x VPP=2 (chunks saved under keys model0/model1): loads the PP=2 checkpoint and
    saves its own, which the TP2 x PP2 launch loads back."""
    groups = parallel.initialize(parallel.ParallelLayout(tp=1, pp=2, vpp=2))
    arch = ModelArch.from_hf_config(workdir / "hf" / "qwen3")
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    load_model_checkpoint(chunks, groups, _ckpt(workdir, "qwen3", layout), expect_arch=arch)
    save_model_checkpoint(chunks, groups, arch, workdir / "qwen3_vpp")
    return {"qwen3_vpp": _logits(arch, groups, None, input_ids, chunks=chunks)}


def _bf16_import(workdir, groups):
    """Import in bf16; load into an fp32 model (the trainer's CPU case): every weight must be
    the HF weight rounded to the dtype it was stored in (bf16; the local spec's norms are
    fp32), then cast exactly."""
    hf_dir = workdir / "hf" / "qwen3"
    ckpt = workdir / "qwen3_bf16"
    import_rank(hf_dir, ckpt, ImportOptions(dtype="bfloat16"), groups=groups)
    arch = ModelArch.from_hf_config(hf_dir)
    chunks = build_model(arch, groups, BuildOptions(init_weights=False))
    load_model_checkpoint(chunks, groups, ckpt)
    got = gather_full_state_dict(chunks, groups, arch)
    ref = LazyFullState(HFCheckpoint(hf_dir))
    stored = stored_metadata(ckpt)
    dtypes = {name: stored[stored_key(name)[0]].dtype for name in got}
    assert torch.bfloat16 in dtypes.values() and all(t.dtype == torch.float32 for t in got.values())
    return [name for name, t in got.items() if not torch.equal(t, ref[name].to(dtypes[name]).float())]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("convert")
    input_ids = torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ref = {}
    for name, (family, overrides) in VARIANTS.items():
        model = tiny_hf_model(family, seed=len(ref), **overrides)
        model.save_pretrained(workdir / "hf" / name)
        ref[name] = hf_logits(model, input_ids)
    preload_for_fork()
    results = {}
    for k, layout in enumerate(LAYOUTS):
        previous = LAYOUTS[k - 1] if k else None
        ranks = run_distributed(_convert_and_run, layout[0] * layout[1],
                                args=(layout, workdir, previous, input_ids))
        results[layout] = {key: v for r in ranks for key, v in r.items() if v is not None}
    return workdir, input_ids, ref, results


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_converted_logits_match_transformers(converted, layout):
    _, _, ref, results = converted
    for name in VARIANTS:
        err = (results[layout][name] - ref[name]).abs().max().item()
        assert err <= TOL, f"{name} at tp,pp={layout}: logits differ from transformers by {err:.2e}"


def test_checkpoint_loads_at_other_tp_and_pp(converted):
    """TP1 -> TP2 (padded vocab 384 -> 512), TP2 -> TP1 (512 -> 384, PP 1 -> 2), TP1 -> TP2."""
    workdir, _, ref, results = converted
    for k in range(1, len(LAYOUTS)):
        layout, previous = LAYOUTS[k], LAYOUTS[k - 1]
        for name in VARIANTS:
            got = results[layout][f"{name}<-{previous}"]
            err = (got - ref[name]).abs().max().item()
            assert err <= TOL, f"{name}: saved at {previous}, loaded at {layout}: logits off by {err:.2e}"
    pads = {read_meta(_ckpt(workdir, "qwen3", l))["padded_vocab_size"] for l in LAYOUTS}
    assert pads == {384, 512}


def test_virtual_pipeline_chunks_load_and_save(converted):
    """PP2 x VPP2 loads a PP2 checkpoint; its own (keys model0, model1) loads at TP2 x PP2."""
    _, _, ref, results = converted
    assert (results[(1, 2)]["qwen3_vpp"] - ref["qwen3"]).abs().max().item() <= TOL
    assert (results[(2, 2)]["qwen3<-vpp"] - ref["qwen3"]).abs().max().item() <= TOL


def test_checkpoint_errors_are_clear_and_safe(converted):
    errors = converted[3][(1, 1)]["errors"]
    assert "does not match the model being loaded: num_layers: checkpoint 4 != model 2" in errors["model"]
    assert "does not match the expected architecture" in errors["expect"]
    assert "vocab_size: 300 != 250; num_kv_heads: 2 != 4" in errors["expect"]
    assert "exists" in errors["exists"] and errors["failed_save"] == "disk full"
    assert errors["intact"] is True


def test_bf16_checkpoint_loads_into_fp32_model(converted):
    assert converted[3][(1, 1)]["bf16"] == []


def test_llama3_rope_scaling_is_applied(converted):
    """The rope-scaled variant matched transformers WITH scaling; without it HF differs
    by far more than the tolerance, so the match is not vacuous."""
    _, input_ids, ref, _ = converted
    family, overrides = VARIANTS["llama_gqa_rope"]
    unscaled = tiny_hf_model(family, seed=0, rope_theta=overrides["rope_theta"])
    assert (hf_logits(unscaled, input_ids) - ref["llama_gqa_rope"]).abs().max().item() > 100 * TOL


def test_round_trip_reproduces_hf_checkpoint(converted, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    workdir, input_ids, ref, _ = converted
    for name in VARIANTS:
        src, back = workdir / "hf" / name, tmp_path / name
        mcore_to_hf(_ckpt(workdir, name, (2, 2)), back, max_shard_size="60KB")
        assert (back / "model.safetensors.index.json").is_file()
        original = load_file(src / "model.safetensors")
        exported = {}
        for file in back.glob("*.safetensors"):
            exported.update(load_file(file))
        assert set(exported) == set(original), f"{name}: {set(exported) ^ set(original)}"
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype, f"{name}: {key}"
            assert torch.equal(exported[key], tensor), f"{name}: {key}"
        _assert_same_config(AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(back), name)
        model = AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
        assert torch.equal(hf_logits(model, input_ids), ref[name]), name


_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "hidden_act",
                  "attention_bias", "bos_token_id", "eos_token_id", "dtype", "architectures")


def _assert_same_config(a, b, name):
    for field in _CONFIG_FIELDS:
        assert getattr(a, field, None) == getattr(b, field, None), f"{name}: config.{field} differs"


def test_cli_round_trip(converted, tmp_path, capsys):
    """The user path: `tip-megatron convert hf-to-mcore` (spawning 2 ranks itself) and back."""
    from safetensors.torch import load_file

    from tip_megatron.apps.cli import main

    src = converted[0] / "hf" / "qwen2_tied"
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(ckpt), "--tp", "2"]) == 0
    assert (ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    assert main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(ckpt), "--tp", "2"]) == 2
    assert "exists; pass overwrite (--overwrite)" in capsys.readouterr().err
    assert main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "x"), "--tp", "4"]) == 2
    assert "does not divide num_kv_heads=2" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", "--ckpt", str(src), "--out", str(tmp_path / "y")]) == 2
    assert "is neither a tip_megatron model checkpoint" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0
    assert (back / "tokenizer_config.json").is_file()
    original, exported = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
