"""`tip-megatron study`: a grid of TIP rules x seeds on the quickstart's embedded task.

    tip-megatron study --rules all random@0.1 q3@0.1 soft_or@0.5 --seeds 3 --out study_run
    tip-megatron study --rules all q3@0.1 --seeds 3 --config run.yaml     # your run config

See docs/study.md. Imports are lazy: `tip-megatron --help` must not import torch.
"""
from __future__ import annotations


def register(subparsers) -> None:
    # lazy: importing a study module (report, curves) need not load the command's parser
    from tip_megatron.apps.study.command import register as _register

    _register(subparsers)
