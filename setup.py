"""Builds pydefend's compiled library by driving CMakeLists.txt (the one build
description) with the torch that is already installed.

Install with `pip install --no-build-isolation -e .` so the build sees that torch.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("pydefend: install PyTorch first (pip install torch==2.13.0), then "
                     "pip install --no-build-isolation -e .")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir),
                     f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
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
    packages=["pydefend", "pydefend.ops", "pydefend.kernels"],
    package_data={"pydefend": ["checkpoints/*/*"]},  # the demo's model
)
