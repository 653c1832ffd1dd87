#!/usr/bin/env bash
# Installs everything pydefend needs on a Debian machine with Python 3.11 (run as root): Fashion-MNIST from
# Debian, PyTorch 2.14.1 with torchvision 0.29.1 (a CUDA 13.0 build, which also runs on a CPU-only machine),
# the Triton that torch pins, timm and transformers (optional extras the model-family tests use), the test
# and plotting dependencies, and pydefend itself, compiled against the installed torch: its CUDA kernels
# too where nvcc is found, for sm_80 and sm_90 (+PTX) unless TORCH_CUDA_ARCH_LIST says otherwise.
# Safe to run again: finished steps are no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "install.sh: not root, skipping Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" >&2
  fi
fi

# numpy<2.4: Triton's interpreter (3.6 at least) calls int() on 1-element arrays, which NumPy 2.4 refuses.
python3 -m pip install -q --disable-pip-version-check \
  torch==2.14.1 torchvision==0.29.1 triton==3.8.0 "numpy<2.4" cmake ninja \
  timm==1.0.31 transformers==5.24.0 \
  safetensors scikit-learn tqdm matplotlib pillow pytest pytest-benchmark hypothesis==6.155.2
# BackPACK (the Fisher tests' peer) goes in without dependencies, so that its loose torch requirement can
# never make pip reconsider the pinned one.
python3 -m pip install -q --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops
python3 -m pip install -q --disable-pip-version-check --no-build-isolation -e .
