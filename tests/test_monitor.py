"""Per-phase peak memory: the counting CPU allocator and nested phases."""
import torch
from torch import nn

from pydefend.monitor import PhaseRecorder, memory_stats, peak_memory

MB = 10**6


def test_peak_counts_live_tensor_bytes_above_the_phase_start():
    held = torch.empty(5 * MB // 4)  # live before the phase: not the phase's
    with peak_memory("cpu") as outer:
        a = torch.empty(10 * MB // 4)
        with peak_memory("cpu") as inner:
            b = torch.empty(25 * MB // 4)
            del b
        del a
        c = torch.empty(3 * MB // 4)
    del c, held
    assert inner["peak_bytes"] == 25 * MB
    assert outer["peak_bytes"] == 35 * MB  # a and b were live together inside it


def test_two_runs_of_the_same_work_agree_from_the_first_call():
    """No warm-up: library code, kernel caches and malloc arenas are not tensor bytes."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 20 * 20, 10))
    x = torch.randn(32, 3, 24, 24)
    recorder = PhaseRecorder("cpu")
    for run in range(3):
        model.zero_grad(set_to_none=True)
        with recorder.phase(f"run{run}"):
            model(x).square().sum().backward()
    peaks = [recorder.phases[f"run{run}"]["peak_bytes"] for run in range(3)]
    activations = 32 * (16 * 22 * 22 + 8 * 20 * 20) * 4
    assert peaks[0] == peaks[1] == peaks[2] and peaks[0] > activations, peaks


def test_stats_follow_allocations_and_frees():
    with peak_memory("cpu"):  # installs the counter
        pass
    live, _ = memory_stats("cpu")
    t = torch.empty(MB)
    assert memory_stats("cpu")[0] == live + 4 * MB
    del t
    assert memory_stats("cpu")[0] == live
