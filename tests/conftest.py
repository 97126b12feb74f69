"""Shared pytest configuration.

Markers: `slow` (end-to-end checks; the default run includes them only in cheap form, see
.ci/run), `gpu` (needs CUDA; skipped without it).
"""
import os

import pytest
import torch

# Keep the parent process single-threaded like the forked ranks: 2-core CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end check (minutes on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
