"""Backend choice for pydefend's ops.

Every op has up to four implementations of the same flat kernel contract:

    "cpp"        compiled C++ kernels, CPU tensors
    "cuda"       compiled CUDA kernels, CUDA tensors (built when torch has CUDA)
    "triton"     Triton kernels, CUDA tensors (CPU tensors under TRITON_INTERPRET=1)
    "reference"  pure PyTorch, any device: the test oracle's twin and the last fallback

By default each call takes the first backend in AUTO_ORDER for its device that
can run it. `use_backend(name)` (a context manager) or the environment variable
PYDEFEND_BACKEND forces one; a forced backend that cannot run the input raises
BackendUnavailable with the reason instead of falling back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _library

BACKENDS = ("cpp", "cuda", "triton", "reference")
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pydefend_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this input; the message says why."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown pydefend backend {name!r}; choose one of {', '.join(BACKENDS)} (or 'auto')")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force every pydefend op in this block onto `name` ("auto" or None: automatic)."""
    token = _forced.set(None if name in (None, "auto") else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("PYDEFEND_BACKEND", "").strip()
    return None if env in ("", "auto") else _check_name(env)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not_native(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if _library.has_cuda_kernels() else "the compiled library was built without CUDA kernels"
    return f"no compiled kernels for {device.type} tensors"


def why_not_triton(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if triton_interpreting() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton does not run {device.type} tensors"


@dataclass(frozen=True)
class Backend:
    """One implementation of an op's flat kernel contract."""
    name: str
    forward: Callable
    backward: Callable
    devices: tuple  # device types it can ever run on
    why_not: Callable[[torch.device], Optional[str]] = lambda device: None

    def reason(self, device: torch.device, *args) -> Optional[str]:
        if device.type not in self.devices:
            return f"{self.name} does not run {device.type} tensors"
        return self.why_not(device, *args)


def select(op: str, backends: dict, device: torch.device, *args) -> Backend:
    """The backend for one call: forced, or the first in AUTO_ORDER that can run it."""
    forced = forced_backend()
    if forced is not None:
        backend = backends.get(forced)
        if backend is None:
            raise BackendUnavailable(f"{op}: no {forced!r} implementation")
        reason = backend.reason(device, *args)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {forced!r} cannot run this input: {reason}")
        return backend
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        backend = backends.get(name)
        if backend is not None and backend.reason(device, *args) is None:
            return backend
    return backends["reference"]


def refuse_double_backward(op: str, name: str):
    """Gives backward op `op` an autograd that raises: without one, torch differentiates through it as if it
    were constant (zero second-order gradients, only a warning)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{name} is not twice differentiable: the gradient of its gradient (a backward "
                           f"through a create_graph=True gradient) is not implemented")

    torch.library.register_autograd(op, backward)


def available(backends: dict, device: torch.device, *args) -> list[str]:
    """Names of the backends that can run this input (for tests and benchmarks)."""
    return [name for name, b in backends.items() if b.reason(device, *args) is None]
