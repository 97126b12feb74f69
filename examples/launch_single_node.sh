#!/usr/bin/env bash
# One node, all its GPUs (or CPU processes): torchrun starts one rank per device.
#   bash examples/launch_single_node.sh examples/configs/qwen3_8b_to_4b.yaml [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: launch_single_node.sh CONFIG.yaml [key=value ...]}; shift
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
exec torchrun --standalone --nproc_per_node "$NPROC" -m tip_megatron.train --config "$CONFIG" "$@"
