#!/usr/bin/env bash
# Installs tip_megatron and everything it needs into the current Python environment.
#
#   bash install.sh            # the package + runtime dependencies
#   bash install.sh test       # ... plus the test extras
#   bash install.sh test,wandb # several extras, comma separated
#   bash install.sh --dry-run gpu  # print the steps it would take; installs nothing
#
# Why a script and not a bare `pip install -e .`: megatron-core 0.19.2 declares
# Requires-Python >= 3.12, yet its cp311 wheel works on 3.11 when installed with
# `--no-deps --ignore-requires-python` AFTER its dependencies (a plain install on 3.11
# silently resolves to 0.16.1). pip cannot express that in install_requires. On Python
# >= 3.12 (NGC containers) the same steps reduce to a plain install.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
EXTRAS=${1:-}
MCORE_VERSION=0.19.2
TORCH_CPU_VERSION=2.13.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pip_install() {
  if [ "$DRY_RUN" = 1 ]; then echo "[dry-run] would run: $PYTHON -m pip install $*"; return; fi
  "$PYTHON" -m pip install --disable-pip-version-check -q "$@"
}

# 1. torch: keep whatever torch is already there (an NGC container ships its own CUDA build);
#    otherwise take the pinned CPU build, which pip finds on local disk. An unpinned torch
#    would pull a multi-GB CUDA build.
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
  echo "[install] torch==${TORCH_CPU_VERSION}"
  pip_install "torch==${TORCH_CPU_VERSION}"
elif [ "$DRY_RUN" = 1 ]; then
  echo "[dry-run] would keep existing torch"
fi

# 2. megatron-core's own dependencies first (triton: imported unconditionally by
#    megatron.core; psutil: needed by dist_checkpointing's saver).
echo "[install] megatron-core dependencies"
pip_install numpy "packaging>=24.2" triton psutil

# 3. megatron-core itself.
# (the installed version from the package metadata: importing megatron.core costs ~10 s)
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('megatron-core').split('+')[0] != '${MCORE_VERSION}')" 2>/dev/null; then
  echo "[install] megatron-core==${MCORE_VERSION}"
  if "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 12))"; then
    pip_install "megatron-core==${MCORE_VERSION}"
  else
    pip_install --no-deps --ignore-requires-python "megatron-core==${MCORE_VERSION}"
  fi
elif [ "$DRY_RUN" = 1 ]; then
  echo "[dry-run] would keep existing megatron-core==${MCORE_VERSION}"
fi

# 4. this package (editable), with the requested extras.
target="$here"
[ -n "$EXTRAS" ] && target="$here[$EXTRAS]"
echo "[install] tip_megatron ${EXTRAS:+[$EXTRAS]}"
pip_install -e "$target"
if [ "$DRY_RUN" = 1 ]; then echo "[dry-run] would check: import tip_megatron, megatron.core, torch"; exit 0; fi
"$PYTHON" -c "import tip_megatron, megatron.core, torch; print('[install] ok: tip_megatron', tip_megatron.__version__, '| megatron-core', megatron.core.__version__, '| torch', torch.__version__)" 2>&1 | grep -v Warning | grep '\[install\]'
