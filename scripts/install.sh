#!/usr/bin/env bash
# Installs everything pydefend needs on a Debian machine with Python 3.11 (CPU
# only, run as root): Fashion-MNIST from Debian, PyTorch 2.13 (CPU wheel),
# Triton, the test and plotting dependencies, and pydefend itself (compiled
# against the installed torch). Safe to run again: finished steps are no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "install.sh: not root, skipping Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" >&2
  fi
fi

# numpy<2.4: Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy 2.4 refuses.
python3 -m pip install -q --disable-pip-version-check \
  torch==2.13.0 triton==3.6.0 "numpy<2.4" cmake ninja \
  safetensors scikit-learn tqdm matplotlib pillow pytest pytest-benchmark
# BackPACK (the Fisher tests' peer) declares torchvision, whose PyPI wheel pulls a newer CUDA torch; its
# SumGradSquared needs neither, so it goes in without dependencies.
python3 -m pip install -q --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops
python3 -m pip install -q --disable-pip-version-check --no-build-isolation -e .
