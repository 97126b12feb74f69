"""Shared pytest configuration.

Markers: `slow` (end-to-end checks of minutes: torchrun launches, multi-node, kill-during-
save, full quickstart pre-training), skipped unless `--slow` is given (or
TIP_MEGATRON_SLOW=1); CI runs them in a second pass (.ci/run). `gpu` (needs CUDA; skipped
without it).
"""
import os

import pytest
import torch

# Keep the parent process single-threaded like the forked ranks: 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the end-to-end tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end check (minutes on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--slow") or os.environ.get("TIP_MEGATRON_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="end-to-end (minutes): run with --slow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
