"""What a result was computed with: versions, device, CPU, threads, seed and command line.

Every report and checkpoint records it, so a number can be traced to the machine and software that
produced it.
"""
from __future__ import annotations

import platform
import shlex
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

import torch

_command_line: list[str] | None = None


def record_command(argv: list[str]):
    """The command line to record for this process (the CLI's own, rather than Python's sys.argv)."""
    global _command_line
    _command_line = list(argv)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from . import __version__
    return {"pydefend": _package_version("pydefend") or __version__, "torch": torch.__version__,
            "triton": _package_version("triton"), "python": platform.python_version()}


def environment(device="cpu", seed: int | None = None) -> dict:
    """The environment of a run on ``device``."""
    device = torch.device(device)
    command = _command_line if _command_line is not None else sys.argv
    record = {**versions(), "device": str(device), "cpu": cpu_model(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "seed": seed, "command": shlex.join(command)}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
    return record
