"""Every CUDA kernel compiles with plain nvcc, GPU or not (the launchers include no torch headers), and a
CUDA torch with nvcc gets the whole CUDA extension built."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pydefend._library import has_cuda_kernels

SOURCES = sorted((Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


def test_every_op_has_cuda_sources():
    assert {p.stem for p in SOURCES} >= {"channel_clip", "neuron_l1", "diag_fisher"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernels cannot be compile-checked on this machine")
    result = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", "-Werror", "all-warnings", str(source),
                             "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cuda_torch_with_nvcc_builds_the_cuda_extension():
    if not torch.version.cuda or shutil.which("nvcc") is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA or nvcc is missing: pydefend builds its CPU kernels only")
    assert has_cuda_kernels(), "the CUDA kernels were not built: see the CMake output of pip install"
