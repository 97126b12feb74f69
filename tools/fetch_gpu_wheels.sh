#!/usr/bin/env bash
# Download the cp312 wheels the lent GPU machine needs into ./wheels (run here, with PyPI).
#
#   bash tools/fetch_gpu_wheels.sh            # megatron-core + small deps + pytest + transformers
#   NO_HF=1 bash tools/fetch_gpu_wheels.sh    # without transformers (its GPU tests then skip)
#
# The GPU machine has Python 3.12 and a CUDA torch (with triton), but no megatron-core, no
# Transformer Engine and no network; tools/gpu_check.sh installs from ./wheels offline. The
# folder is git-ignored and travels as a carried path (the carry limit is 64 MiB in all).
# megatron-core is fetched with --no-deps: it declares torch, which must stay the machine's
# CUDA build (a resolved download would pull a multi-GB torch). The other sets are resolved
# (pure python or small abi3/cp312 wheels; none of them depends on torch).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$here/wheels}
mkdir -p "$dest"
target=(--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
        -d "$dest" -q)
pip download --no-deps "${target[@]}" megatron-core==0.19.2
# tip_megatron's own runtime deps (setup.py install_requires, minus torch/triton) + pytest.
pip download "${target[@]}" numpy "packaging>=24.2" psutil pyyaml safetensors "pytest>=8"
if [ "${NO_HF:-0}" != 1 ]; then
  # tests/gpu/test_generate_gpu.py compares greedy tokens with HF transformers.
  pip download "${target[@]}" transformers==5.24.0
fi
size_mib=$(du -sm "$dest" | cut -f1)
echo "fetch_gpu_wheels: $(ls "$dest" | wc -l) wheels, ${size_mib} MiB in $dest"
if [ "$size_mib" -gt 56 ]; then
  echo "fetch_gpu_wheels: over 56 MiB: the carry (64 MiB with the tree) may not fit; use NO_HF=1" >&2
  exit 1
fi
