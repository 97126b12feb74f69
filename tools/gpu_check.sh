#!/usr/bin/env bash
# The GPU check, in one call: install from carried wheels, run the GPU test tier, one
# student training step at the paper's Qwen3-4B shape (memory, speed, decode); everything
# lands under $OUT (default ./gpu_results).
#
#   OUT=/tmp/gpu bash tools/gpu_check.sh            # < 10 min on one H200, incl. install
#   OUT=/tmp/gpu bash tools/gpu_check.sh --quick    # < 3 min: precision tests + short bench
#
# The lent machine has Python 3.12 + a CUDA torch, no megatron-core, no TE, no network:
# run `bash tools/fetch_gpu_wheels.sh` first (here, with PyPI) and carry ./wheels.
# Results: summary.txt (one line per stage: rc, seconds), gpu_tests.xml, bench_gpu_step.json
# + .md (the table for docs/gpu.md), env.txt, gpu.csv, gpu_check.log. (The CPU micro-
# benchmarks tools/bench_vocab_parallel.py and bench_generate.py are not part of it any more:
# bench_gpu_step measures decode on the GPU, and the 10-minute budget goes to the step.)
set -uo pipefail
quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *) echo "gpu_check: unknown argument $arg (accepted: --quick)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
# The package is used in place (no `pip install -e .`: an offline editable install would
# need setuptools in a build environment the machine cannot download).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start_all=$(date +%s)
: > "$OUT/summary.txt"

stage() {  # stage NAME TIMEOUT_S CMD...: run, record rc and seconds, never abort the check
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.csv"
if [ -d wheels ]; then
  # Resolved offline from ./wheels: packages already present (numpy, ...) are kept.
  pkgs="numpy packaging>=24.2 psutil pyyaml safetensors pytest>=8"
  ls wheels/transformers-*.whl >/dev/null 2>&1 && pkgs="$pkgs transformers"
  python -m pip install -q --no-index --find-links wheels $pkgs || exit 1
  # --no-deps: megatron-core declares torch, which must stay the machine's CUDA build.
  python -m pip install -q --no-index --find-links wheels --no-deps megatron-core==0.19.2 || exit 1
fi
python - <<'PY' | tee "$OUT/env.txt" || exit 1
import sys, torch, triton, megatron.core, tip_megatron
from tip_megatron.runtime.device import cuda_capability
from tip_megatron.runtime.optional import optional_deps
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), "capability", cuda_capability())
print("megatron-core", megatron.core.__version__, "triton", triton.__version__,
      "optional deps", optional_deps())
PY
echo "install+env seconds=$(( $(date +%s) - start_all ))" | tee -a "$OUT/summary.txt"

status=0
bench=()
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  # A smoke run of this script on a CPU machine: GPU tests skip, the bench uses tiny shapes.
  echo "gpu_check: no CUDA here: bench_gpu_step runs --tiny (no GPU figure is produced)"
  bench=(--tiny)
fi
if [ $quick = 1 ]; then
  stage gpu_tests_precision 120 python -m pytest -q tests/gpu/test_gpu_precision.py \
    --junitxml "$OUT/gpu_tests.xml"
  stage bench_gpu_step 150 python tools/bench_gpu_step.py --quick "${bench[@]}" \
    --json "$OUT/bench_gpu_step.json" --md "$OUT/bench_gpu_step.md"
else
  stage gpu_tests 240 python -m pytest -q tests/gpu --junitxml "$OUT/gpu_tests.xml"
  stage bench_gpu_step 300 python tools/bench_gpu_step.py "${bench[@]}" \
    --json "$OUT/bench_gpu_step.json" --md "$OUT/bench_gpu_step.md"
fi
echo "gpu_check: exit $status after $(( $(date +%s) - start_all ))s (quick=$quick)" | tee -a "$OUT/summary.txt"
exit $status
