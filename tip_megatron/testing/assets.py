"""Builders of test assets, made on the spot (no downloads): tiny random model checkpoints
in the engine's format, addition prompts, a byte-level BPE tokenizer, HF models imported
through the converter, a SentencePiece char model, the overrides of a tiny OPD run, random
built-in models in a quickstart cache, and the rank bodies tests hand to run_distributed.

    root = opd_assets(tmp_path_factory.mktemp("opd"), teacher_layers=4)
    history = run_distributed(train_history, 2, args=(tiny_run_overrides(root),))
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

#: The tiny student and teacher of the trainer-level tests: random Llamas of different
#: width (and depth), far enough apart that every token has a distinct entropy and KL.
STUDENT = dict(hidden=64, layers=2, seed=1)
TEACHER = dict(hidden=96, seed=2)


def model_checkpoint(out, hidden: int, layers: int, seed: int, family: str = "llama",
                     max_pos: int = 64, vocab_size: int = 250) -> None:
    """Rank body: save a random tiny model at PyTorch-default scales to `out` (megatron's
    N(0, 0.02) init leaves a tiny model near-uniform, every token nearly tied, and top-k
    selection ill-posed)."""
    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.checkpoint.model import save_model_checkpoint
    from tip_megatron.models.init import init_full_state
    from tip_megatron.models.state import load_full_state_dict
    from tip_megatron.testing.models import tiny_arch

    arch = tiny_arch(family, hidden_size=hidden, num_layers=layers, max_position_embeddings=max_pos,
                     vocab_size=vocab_size)
    g = parallel.initialize(parallel.ParallelLayout(), seed=seed)
    chunks = build_model(arch, g)
    load_full_state_dict(chunks, init_full_state(chunks, g, arch, seed), g, arch)
    save_model_checkpoint(chunks, g, arch, str(out))


def _student_and_teacher(root: str, teacher_layers: int, other: bool) -> None:
    model_checkpoint(f"{root}/student", **STUDENT)
    model_checkpoint(f"{root}/teacher", layers=teacher_layers, **TEACHER)
    if other:  # a checkpoint of another architecture (a resume must refuse it)
        model_checkpoint(f"{root}/other", 64, 2, 3, family="qwen3")


def addition_prompts(path, num: int, seed: int = 0) -> Path:
    """`num` rows {"prompt": "abc+def=", "answer": "<sum>"} (the character tokenizer's task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        rows.append({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)})
    return write_jsonl(path, rows)


def opd_assets(root, *, teacher_layers: int, num_prompts: int = 64, other: bool = False) -> Path:
    """root/student, root/teacher (model checkpoints), root/prompts.jsonl; root/other (a
    tiny Qwen3) with `other`. The models are made in one forked rank on the CPU: checkpoints
    are device-independent, and on a GPU machine a forked child must not touch CUDA."""
    from tip_megatron.testing.distributed import run_distributed

    root = Path(root)
    run_distributed(_student_and_teacher, 1, args=(str(root), teacher_layers, other),
                    env={"TIP_MEGATRON_DEVICE": "cpu"})
    addition_prompts(root / "prompts.jsonl", num_prompts)
    return root


def tiny_run_overrides(assets, **extra) -> list[str]:
    """`key=value` overrides of a 3-step OPD run on `opd_assets` (char tokenizer, Soft-OR at
    rho 0.5); `extra` replaces or adds keys."""
    assets = Path(assets)
    base = {
        "student.ckpt": assets / "student", "teacher.ckpt": assets / "teacher",
        "data.prompts": f"[{assets / 'prompts.jsonl'}]", "data.tokenizer": "char",
        "data.prompts_per_step": 16, "data.max_prompt_len": 16,
        "rollout.max_new_tokens": 6, "selection.rule": "soft_or", "selection.rho": 0.5,
        "optim.lr": 0.003, "optim.warmup_steps": 0, "train.steps": 3, "train.micro_batch_size": 2,
        "logging.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_history(overrides: list[str]) -> list[dict]:
    """Rank body: train; the logging rank returns its per-step metrics, the others []."""
    from tip_megatron.config import load_config
    from tip_megatron.train.trainer import run

    return run(load_config(None, overrides))


def logged_history(results: list) -> list[dict]:
    """The per-step metrics of a run's one logging rank, from every rank's `train_history`."""
    hist = [h for h in results if h]
    assert len(hist) == 1, "exactly one rank logs"
    return hist[0]


def cli_main(argv: list[str]) -> int:
    """Rank body: `tip-megatron ARGV` in this (forked) rank; its exit code."""
    from tip_megatron.apps.cli import main

    return main(argv)


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bpe_tokenizer(directory, corpus: list[str]) -> None:
    """Save a byte-level BPE tokenizer (vocab 280, eos <|im_end|>, pad <|endoftext|>)
    trained on `corpus` to `directory` (needs tokenizers and transformers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(str(directory))


def imported_hf_model(hf_dir, ckpt_dir, *, seed: int, corpus: list[str], family: str = "qwen2"):
    """A tiny random HF model with a BPE tokenizer saved to `hf_dir`, imported to the
    engine's format in `ckpt_dir` (`convert hf-to-mcore`); returns the HF model."""
    from tip_megatron.checkpoint.hf import ImportOptions, hf_to_mcore
    from tip_megatron.testing.hf_models import tiny_hf_model

    model = tiny_hf_model(family, seed=seed)
    model.save_pretrained(hf_dir)
    bpe_tokenizer(hf_dir, corpus)
    hf_to_mcore(hf_dir, ckpt_dir, ImportOptions())
    return model


def char_spm_model(path, chars: str) -> None:
    """Save a SentencePiece char model over `chars` to `path` (needs sentencepiece)."""
    import sentencepiece as spm

    text = "\n".join(chars[i:] + chars[:i] for i in range(len(chars))) * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                   vocab_size=len(set(chars)) + 4, model_type="char",
                                   character_coverage=1.0)
    Path(path).write_bytes(model.getvalue())


def fill_quickstart_cache(cache_dir: str) -> list[str]:
    """Rank body: random (untrained) built-in teacher and student in the quickstart cache at
    `cache_dir`, where pre-training would put them; returns the file names written."""
    import torch

    from tip_megatron.runtime import parallel
    from tip_megatron.models import build_model
    from tip_megatron.models.init import init_full_state
    from tip_megatron.apps.quickstart import pretrain

    g = parallel.initialize(parallel.ParallelLayout())
    written = []
    for seed, (name, arch, recipe) in enumerate((
            ("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE),
            ("student", pretrain.student_arch(), pretrain.STUDENT_RECIPE))):
        full = init_full_state(build_model(arch, g), g, arch, seed)
        path = pretrain.cache_path(cache_dir, name, arch, recipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state_dict=full, info=dict(name=name, random=True)), path)
        written.append(path.name)
    return written
