"""Wall time and peak memory per phase of a defense.

A phase's peak memory is the most tensor memory live at once during the phase, above what was live when it
began. On CUDA it comes from the caching allocator's counters (``torch.cuda.max_memory_allocated``). On CPU it
comes from pydefend's counting allocator (``torch.ops.pydefend_native.cpu_memory_stats``), which sits in front
of torch's CPU allocator once the first phase starts and counts every allocation made through it. Neither counts
library code, Python objects or memory the C library keeps after a free, so the figure needs no warm-up and two
runs of the same work agree: the page-level RSS a first call inflates with loaded kernels is not part of it.

Phases may nest. Each phase boundary reads and resets the device's peak counter, and every phase still open
keeps the largest peak seen in any of its segments.
"""
from __future__ import annotations

import contextlib
import time

import torch

METHOD = ("peak live tensor bytes above the phase's start: torch's CUDA allocator counters, or on CPU "
          "pydefend's counting allocator in front of torch's")

_open_phases: dict[str, list[dict]] = {}
_cpu_tracking: bool | None = None


def track_cpu_memory() -> bool:
    """Installs the counting CPU allocator (once; later calls are free). False when torch's allocator
    cannot be wrapped, and CPU peaks are then reported as None."""
    global _cpu_tracking
    if _cpu_tracking is None:
        from ._library import load
        load()
        _cpu_tracking = bool(torch.ops.pydefend_native.cpu_memory_track())
    return _cpu_tracking


def memory_stats(device, reset_peak: bool = False) -> tuple[int, int] | None:
    """(live bytes, peak live bytes since the last reset) on ``device``, or None where unmeasured."""
    device = torch.device(device)
    if device.type == "cuda":
        current, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return current, peak
    if device.type == "cpu" and track_cpu_memory():
        return tuple(torch.ops.pydefend_native.cpu_memory_stats(reset_peak))
    return None


def _boundary(device: torch.device) -> int | None:
    """Reads and resets the peak counter, crediting the peak to every open phase; returns live bytes."""
    stats = memory_stats(device, reset_peak=True)
    if stats is None:
        return None
    current, peak = stats
    for frame in _open_phases.get(str(device), []):
        frame["max"] = max(frame["max"], peak)
    return current


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict that holds {'peak_bytes': int or None} once the block ends."""
    result = {}
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = _boundary(device)
    frame = {"max": start or 0}
    stack = _open_phases.setdefault(str(device), [])
    stack.append(frame)
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _boundary(device)
        stack.remove(frame)
        result["peak_bytes"] = None if start is None else max(0, frame["max"] - start)


class PhaseRecorder:
    """Collects {phase: {'seconds', 'peak_bytes'}} for a report."""

    def __init__(self, device="cpu"):
        self.device = device
        self.phases: dict[str, dict] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        with peak_memory(self.device) as mem:
            yield
        self.phases[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_bytes": mem["peak_bytes"]}

    def to_dict(self) -> dict:
        return dict(self.phases)
