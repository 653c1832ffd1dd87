"""Builds pydefend's compiled library by driving CMakeLists.txt (the one build
description) with the torch that is already installed.

Install with `pip install --no-build-isolation -e .` so the build sees that torch.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cuda_architectures(torch) -> str | None:
    """CMake's CUDA architectures: $CMAKE_CUDA_ARCHITECTURES, else $TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", the
    ecosystem's convention), else this machine's GPUs, else None: CMakeLists.txt's default list, which needs
    no GPU."""
    if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
        return os.environ["CMAKE_CUDA_ARCHITECTURES"]
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    if listed:
        archs = []
        for item in listed:
            match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
            if not match:
                sys.exit(f"pydefend: TORCH_CUDA_ARCH_LIST: cannot read {item!r} (expected e.g. 8.0 or 9.0+PTX)")
            sm = match[1] + match[2] + match[3]
            archs.append(sm if match[4] else f"{sm}-real")
        return ";".join(archs)
    return "native" if torch.cuda.is_available() else None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            sys.exit("pydefend: install PyTorch first (pip install torch==2.14.1), then "
                     "pip install --no-build-isolation -e .")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir),
                     f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
        architectures = cuda_architectures(torch) if torch.version.cuda else None
        if architectures:
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={architectures}")
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "_C.so", target)


setup(
    ext_modules=[CMakeExtension("pydefend._C")],
    cmdclass={"build_ext": CMakeBuild},
    package_dir={"pydefend": "pydefend", "pydefend.kernels": "kernels"},
    packages=["pydefend", "pydefend.defenses", "pydefend.ops", "pydefend.kernels"],
    package_data={"pydefend": ["checkpoints/*/*"]},  # the demo's model
)
