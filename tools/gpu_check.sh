#!/usr/bin/env bash
# The GPU check, in one call: install from carried wheels, run the GPU test tier and the
# benchmarks, write everything under $OUT (default ./gpu_results).
#
#   OUT=/tmp/gpu bash tools/gpu_check.sh
#
# The lent GPU machine has Python 3.12 with a CUDA torch, no megatron-core, no Transformer
# Engine and no network: put the wheels it needs in ./wheels first, on a machine with
# network access:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d wheels \
#       megatron-core==0.19.2 triton psutil pyyaml safetensors packaging
# TE is too large to carry there; its tests skip (they run in an NGC container).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python - <<'PY' | tee "$OUT/env.txt"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())
PY
if [ -d wheels ]; then
  python -m pip install --no-index --find-links wheels --no-deps -q wheels/*.whl || exit 1
fi
python -m pip install --no-deps -q -e . || exit 1
python -c "import megatron.core, tip_megatron; print('megatron-core', megatron.core.__version__)" || exit 1

status=0
python -m pytest -q tests/gpu --junitxml "$OUT/gpu_tests.xml" || status=1
python tools/bench_vocab_parallel.py --json "$OUT/bench_vocab_parallel.json" || status=1
python tools/bench_generate.py --json "$OUT/bench_generate.json" || status=1
echo "gpu_check: exit $status"
exit $status
