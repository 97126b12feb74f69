# tip_megatron on an NGC PyTorch image (Python 3.12, CUDA torch, Transformer Engine, apex).
#
#   docker build -t tip-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v "$PWD/runs:/workspace/runs" tip-megatron tip-megatron train --config ...
#
# install.sh keeps the image's torch (and the TE and apex built against it), installs
# megatron-core 0.19.2 plainly (Python 3.12) and this package editable with the `gpu`
# extra; never the `te` extra, which would build a second TE from source. The image's pip
# constraints (/etc/pip/constraint.txt) stay active, so a dependency that would replace a
# package the image pins fails the build instead of silently swapping it. docs/container.md
# has Slurm (pyxis/enroot) usage; this image was not built in the project's CI (no Docker).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: the image's packages live in the system Python 3.12; should
# the base keep Ubuntu's EXTERNALLY-MANAGED marker, pip would refuse to add to them.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TIP_MEGATRON_CACHE=/workspace/.cache/tip_megatron

WORKDIR /opt/tip_megatron
COPY . .
# Fail the build, not the first GPU run, when the base image lacks TE (megatron-core then
# uses TE's fused Adam; apex is only a fallback, so its absence is a note).
RUN PYTHON=python bash install.sh gpu \
    && python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('transformer_engine') else 'error: base image lacks transformer_engine')" \
    && (python -c "import apex.optimizers" 2>/dev/null || echo "note: base image has no NVIDIA apex")

WORKDIR /workspace
CMD ["tip-megatron", "--help"]
