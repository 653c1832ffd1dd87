"""The registered ops refuse bad arguments with one clear error, never a crash or a silent wrong answer.

The raw ops (torch.ops.pydefend_native.*, and the public schemas torch.ops.pydefend.*) are called with sizes
whose products overflow int64, counts that would index past a buffer, unsupported dtypes and mismatched
tensors. Before these checks some of them died of SIGFPE or SIGSEGV, so the cases run in a child process: a
regression kills the child, not pytest. The child runs the cases in order and reports each as one JSON line;
when it dies, the case it was running is recorded as a crash and a new child continues after it.
"""
import json
import re
import signal
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
import torch
import pydefend.ops  # loads the library and registers the public ops
N, P = torch.ops.pydefend_native, torch.ops.pydefend
cases = json.loads(sys.argv[1])
for name, code in cases:
    print(json.dumps({"case": name, "started": True}), flush=True)
    try:
        exec(code, {"torch": torch, "N": N, "P": P})
    except Exception as e:
        outcome = {"case": name, "error": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else ""}
    else:
        outcome = {"case": name, "error": None, "message": "accepted"}
    print(json.dumps(outcome), flush=True)
"""

CC = "x = torch.randn(256); u = torch.rand(64); y, m = N.channel_clip_fwd(x, u, 1, False)\n"
SH = "z = torch.randn(8, 4); low = torch.full((4,), -1.0); nb = torch.tensor([5, 5, 5, 5]); g = torch.zeros(4, 5)\n"
DF = "dy = torch.randn(2, 1, 3, 4); x = torch.randn(2, 1, 3, 4); mean = torch.zeros(1, 1, 3); r = torch.ones(1, 1, 3)\n"
CONV = "x = torch.randn(2, 3, 6, 6); dy = torch.randn(2, 4, 4, 4)\n"
RG = "x = torch.randn(2, 3, 6, 6); w = torch.randn(4, 3, 3, 3); dy = torch.randn(2, 4, 4, 4)\n"

# name -> (code, expected exception type, regex its first line must match)
CASES = {
    # channel_clip: inner * upper.numel() wrapped to a divisor of numel (uninitialised grad_x), or to 0 (SIGFPE)
    "channel_clip_fwd inner*period wraps": (CC + "N.channel_clip_fwd(x, u, 2**58 + 1, False)", "RuntimeError",
                                            r"not a multiple of inner \* upper.numel\(\) = 288230376151711745 \* 64"),
    "channel_clip_bwd inner*period wraps": (CC + "N.channel_clip_bwd(x, m, u, 2**58 + 1, False)", "RuntimeError",
                                            r"not a multiple of inner \* upper.numel\(\)"),
    "channel_clip_fwd inner*period wraps to 0": (CC + "N.channel_clip_fwd(x, u[:4], 2**62, False)", "RuntimeError",
                                                 r"not a multiple of inner \* upper.numel\(\)"),
    "channel_clip_bwd inner*period wraps to 0": (CC + "N.channel_clip_bwd(x, m, u[:4], 2**62, False)",
                                                 "RuntimeError", r"not a multiple of inner \* upper.numel\(\)"),
    "channel_clip inner 0": (CC + "N.channel_clip_fwd(x, u, 0, False)", "RuntimeError", r"inner must be >= 1, got 0"),
    "channel_clip inner negative": (CC + "N.channel_clip_bwd(x, m, u, -4, False)", "RuntimeError",
                                    r"inner must be >= 1, got -4"),
    "channel_clip empty upper": (CC + "N.channel_clip_fwd(x, u[:0], 1, False)", "RuntimeError", r"upper is empty"),
    "channel_clip int x": ("N.channel_clip_fwd(torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), "
                           "1, False)", "RuntimeError", r"x must be float32, float64, float16 or bfloat16, got Int"),
    "channel_clip float8 x": ("t = torch.ones(4).to(torch.float8_e4m3fn); N.channel_clip_fwd(t, t, 1, False)",
                              "RuntimeError", r"x must be float32, float64, float16 or bfloat16"),
    "channel_clip upper dtype": (CC + "N.channel_clip_fwd(x, u.double(), 1, False)", "RuntimeError",
                                 r"upper has dtype Double but x has Float"),
    "channel_clip mask too short": (CC + "N.channel_clip_bwd(x, m[:-1], u, 1, False)", "RuntimeError",
                                    r"mask must be the forward's uint8 mask on cpu, 32 bytes for 256 elements"),
    "channel_clip mask of the other layout": (CC + "N.channel_clip_bwd(x, m, u, 1, True)", "RuntimeError",
                                              r"64 bytes for 256 elements; got Byte on cpu with 32 bytes"),
    "channel_clip mask dtype": (CC + "N.channel_clip_bwd(x, m.to(torch.int8), u, 1, False)", "RuntimeError",
                                r"mask must be the forward's uint8 mask"),
    # soft_histogram: inner * C wrapped to 0 (SIGFPE) or to a divisor (rows summing to [2, 0])
    "soft_histogram_bwd inner*C wraps to 0": (SH + "N.soft_histogram_bwd(g, z, low, nb, 2**62, 0.1, 150.0, 4, 1.6)",
                                              "RuntimeError", r"not a multiple of inner \* channels = "
                                                              r"4611686018427387904 \* 4"),
    "soft_histogram_bwd inner 2^63-1": (SH + "N.soft_histogram_bwd(g, z, low, nb, 2**63 - 1, 0.1, 150.0, 4, 1.6)",
                                        "RuntimeError", r"not a multiple of inner \* channels"),
    "soft_histogram_fwd inner*C wraps": (SH + "N.soft_histogram_fwd(z, low, nb, 2**62 + 1, 5, 0.1, 150.0, 4, 1.6)",
                                         "RuntimeError", r"not a multiple of inner \* channels"),
    "soft_histogram inner 0": (SH + "N.soft_histogram_fwd(z, low, nb, 0, 5, 0.1, 150.0, 4, 1.6)", "RuntimeError",
                               r"inner must be >= 1, got 0"),
    "soft_histogram num_bins 0": (SH + "N.soft_histogram_fwd(z, low, torch.tensor([5, 0, 5, 5]), 1, 5, 0.1, 150.0, "
                                       "4, 1.6)", "RuntimeError", r"num_bins\[1\] = 0 is outside \[1, max_bins = 5\]"),
    "soft_histogram num_bins past max_bins": (SH + "N.soft_histogram_bwd(g, z, low, torch.tensor([5, 5, 9, 5]), 1, "
                                                   "0.1, 150.0, 4, 1.6)", "RuntimeError",
                                              r"num_bins\[2\] = 9 is outside \[1, max_bins = 5\]"),
    "soft_histogram max_bins huge": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 2**61, 0.1, 150.0, 4, 1.6)",
                                     "RuntimeError", r"max_bins must be in \[1, 2\^24\], got 2305843009213693952"),
    "soft_histogram max_bins 0": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 0, 0.1, 150.0, 4, 1.6)", "RuntimeError",
                                  r"max_bins must be in \[1, 2\^24\], got 0"),
    "soft_histogram num_bins float": (SH + "N.soft_histogram_fwd(z, low, nb.float(), 1, 5, 0.1, 150.0, 4, 1.6)",
                                      "RuntimeError", r"num_bins must be a 1-D int64 tensor with one entry per "
                                                      r"channel \(4\), got Float"),
    "soft_histogram num_bins short": (SH + "N.soft_histogram_fwd(z, low, nb[:3], 1, 5, 0.1, 150.0, 4, 1.6)",
                                      "RuntimeError", r"num_bins must be a 1-D int64 tensor"),
    "soft_histogram low 2-D": (SH + "N.soft_histogram_fwd(z, low[:, None], nb, 1, 5, 0.1, 150.0, 4, 1.6)",
                               "RuntimeError", r"low must be a 1-D Float tensor"),
    "soft_histogram low NaN": (SH + "low[2] = float('nan'); N.soft_histogram_fwd(z, low, nb, 1, 5, 0.1, 150.0, 4, "
                                    "1.6)", "RuntimeError", r"low\[2\] = nan .* not finite in Float"),
    "soft_histogram edges overflow float32": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 5, 1e38, 150.0, 4, 1.6)",
                                              "RuntimeError", r"low\[0\] = -1 with 5 bins of width 1e\+38 gives "
                                                              r"edges that are not finite in Float"),
    "soft_histogram width 0": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 5, 0.0, 150.0, 4, 1.6)", "RuntimeError",
                               r"width must be a finite number > 0 in Float, got 0"),
    "soft_histogram width below float32": (SH + "N.soft_histogram_bwd(g, z, low, nb, 1, 1e-50, 150.0, 4, 1.6)",
                                           "RuntimeError", r"width must be a finite number > 0 in Float"),
    "soft_histogram tau inf in float32": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 5, 0.1, 1e39, 4, 1.6)",
                                          "RuntimeError", r"tau must be a finite number > 0 in Float, got 1e\+39"),
    "soft_histogram tau nan": (SH + "N.soft_histogram_bwd(g, z, low, nb, 1, 0.1, float('nan'), 4, 1.6)",
                               "RuntimeError", r"tau must be a finite number > 0"),
    "soft_histogram reach nan": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 5, 0.1, 150.0, 4, float('nan'))",
                                 "RuntimeError", r"reach must be a finite number >= 0"),
    "soft_histogram window 0": (SH + "N.soft_histogram_fwd(z, low, nb, 1, 5, 0.1, 150.0, 0, 1.6)", "RuntimeError",
                                r"window must be >= 1, got 0"),
    "soft_histogram empty z": (SH + "N.soft_histogram_fwd(z[:0], low, nb, 1, 5, 0.1, 150.0, 4, 1.6)", "RuntimeError",
                               r"z has no elements per channel"),
    "soft_histogram 2^31 per channel": ("N.soft_histogram_fwd(torch.zeros(1).expand(2**31), torch.zeros(1), "
                                        "torch.tensor([2]), 1, 2, 0.1, 150.0, 2, 1.6)", "RuntimeError",
                                        r"2147483648 elements per channel; at most 2\^31 - 1"),
    "soft_histogram int z": (SH + "N.soft_histogram_fwd(z.long(), low, nb, 1, 5, 0.1, 150.0, 4, 1.6)",
                             "RuntimeError", r"z must be float32, float64, float16 or bfloat16, got Long"),
    "soft_histogram low dtype": (SH + "N.soft_histogram_fwd(z, low.double(), nb, 1, 5, 0.1, 150.0, 4, 1.6)",
                                 "RuntimeError", r"low must be a 1-D Float tensor for Float z, got Double"),
    "soft_histogram grad shape": (SH + "N.soft_histogram_bwd(g[:3], z, low, nb, 1, 0.1, 150.0, 4, 1.6)",
                                  "RuntimeError", r"histogram gradient must be \(C, max_bins\) with C = 4"),
    "soft_histogram grad 1-D": (SH + "N.soft_histogram_bwd(g[0], z, low, nb, 1, 0.1, 150.0, 4, 1.6)", "RuntimeError",
                                r"histogram gradient must be \(C, max_bins\)"),
    "soft_histogram grad bins past 2^24": (SH + "N.soft_histogram_bwd(torch.zeros(4, 1).expand(4, 2**25), z, low, "
                                                "nb, 1, 0.1, 150.0, 4, 1.6)", "RuntimeError",
                                           r"max_bins must be in \[1, 2\^24\], got 33554432"),
    # neuron_l1_change
    "neuron_l1 int": ("t = torch.ones(2, 3, dtype=torch.int32); N.neuron_l1_change([t], [t])", "RuntimeError",
                      r"pair 0 has dtype Int; supported: float32, float64, float16, bfloat16"),
    "neuron_l1 shapes": ("N.neuron_l1_change([torch.ones(2), torch.ones(2, 3)], [torch.ones(2), torch.ones(3, 2)])",
                         "RuntimeError", r"pair 1 has shapes \[2, 3\] and \[3, 2\]"),
    "neuron_l1 lengths": ("N.neuron_l1_change([torch.ones(2)], [torch.ones(2), torch.ones(2)])", "RuntimeError",
                          r"got 1 tensors in params_a but 2 in params_b"),
    # diag_fisher
    "diag_fisher_norm stats": (DF + "N.diag_fisher_norm(dy, x, mean[:, :, :2], r[:, :, :2])", "RuntimeError",
                               r"stats of shape \[1, 1, 2\] do not fit input"),
    "diag_fisher_norm float8": (DF + "t = x.to(torch.float8_e4m3fn); N.diag_fisher_norm(t, t, mean, r)",
                                "RuntimeError", r"share a floating dtype \(float32, float64, float16 or bfloat16\)"),
    "diag_fisher_norm stats dtype": (DF + "N.diag_fisher_norm(dy, x, mean.double(), r)", "RuntimeError",
                                     r"mean and invstd must be Float for Float inputs, got Double and Float"),
    "diag_fisher_norm shapes": (DF + "N.diag_fisher_norm(dy[:1], x, mean, r)", "RuntimeError",
                                r"must both be \(N, A, P, B\)"),
    "diag_fisher_conv2d padding overflows": (CONV + "N.diag_fisher_conv2d(dy[:, :, :0, :0], x, [3, 3], [1, 1], "
                                                    "[2**62, 2**62], [1, 1], 1)", "RuntimeError",
                                             r"padding 4611686018427387904 or dilation 1 x kernel 3 along dim 2 does "
                                             r"not fit int64"),
    "diag_fisher_conv2d dilation overflows": (CONV + "N.diag_fisher_conv2d(dy, x, [3, 3], [1, 1], [0, 0], "
                                                     "[2**62, 1], 1)", "RuntimeError", r"does not fit int64"),
    "diag_fisher_conv2d kernel overflows": (CONV + "N.diag_fisher_conv2d(dy, x, [2**40, 2**40], [1, 1], [0, 0], "
                                                   "[1, 1], 1)", "RuntimeError", r"more weights than int64 counts"),
    "diag_fisher_conv2d stride 0": (CONV + "N.diag_fisher_conv2d(dy, x, [3, 3], [0, 1], [0, 0], [1, 1], 1)",
                                    "RuntimeError", r"stride, dilation must be >= 1"),
    "diag_fisher_conv2d kernel wider than input": (CONV + "N.diag_fisher_conv2d(dy[:, :, :1, :1], x[..., :4, :4], "
                                                          "[5, 5], [2, 2], [0, 0], [1, 1], 1)", "RuntimeError",
                                                   r"gives 0 along dim 2"),
    "diag_fisher_conv2d groups 0": (CONV + "N.diag_fisher_conv2d(dy, x, [3, 3], [1, 1], [0, 0], [1, 1], 0)",
                                    "RuntimeError", r"0 groups do not divide"),
    "diag_fisher_linear shapes": ("N.diag_fisher_linear(torch.randn(2, 3, 4), torch.randn(2, 5, 4))", "RuntimeError",
                                  r"expected input \(N, L, I\) and grad_out \(N, L, O\)"),
    # reproducible gradients
    "conv2d_weight_grad chunk 0": (RG + "N.conv2d_weight_grad(dy, x, w, [1, 1], [0, 0], [1, 1], 1, True, 0)",
                                   "RuntimeError", r"conv2d_weight_grad: chunk must be >= 1, got 0"),
    "conv2d_weight_grad batch": (RG + "N.conv2d_weight_grad(dy[:1], x, w, [1, 1], [0, 0], [1, 1], 1, True, 1)",
                                 "RuntimeError", r"input has 2 samples but grad_out has 1"),
    "conv2d_weight_grad stride entries": (RG + "N.conv2d_weight_grad(dy, x, w, [1], [0, 0], [1, 1], 1, True, 1)",
                                          "RuntimeError", r"stride, padding and dilation must have two entries"),
    "conv2d_weight_grad stride 0": (RG + "N.conv2d_weight_grad(dy, x, w, [0, 1], [0, 0], [1, 1], 1, True, 1)",
                                    "RuntimeError", r"non-positive stride"),
    "linear_weight_grad chunk": ("N.linear_weight_grad(torch.randn(3, 4), torch.randn(3, 5), True, -1)",
                                 "RuntimeError", r"linear_weight_grad: chunk must be >= 1, got -1"),
    # the public schemas called directly (their Python kernels check, the native ones behind them too)
    "pydefend.soft_histogram_fwd tau inf in float32": ("P.soft_histogram_fwd(torch.randn(8, 4), torch.zeros(4), "
                                                       "0.1, [5], 1e39, 1)", "ValueError",
                                                       r"tau must be a finite number > 0 in torch.float32"),
    "pydefend.soft_histogram_bwd edges overflow": ("P.soft_histogram_bwd(torch.zeros(4, 5), torch.randn(8, 4), "
                                                   "torch.full((4,), 3e38), 1e37, [5], 150.0, 1)", "ValueError",
                                                   r"channel 0's edges low \+ i \* width reach past the "
                                                   r"torch.float32 range"),
    "pydefend.channel_clip_fwd ambiguous upper": ("P.channel_clip_fwd(torch.randn(3, 5), torch.rand(5), 0, False)",
                                                  "ValueError", r"a 1-D upper holds one bound per channel and must "
                                                                r"be \(3,\) for channel_dim=0"),
    "pydefend.channel_clip_bwd bad mask": ("P.channel_clip_bwd(torch.randn(3, 5), torch.zeros(1, dtype=torch.uint8), "
                                           "torch.rand(5), 1, False, [0, 1])", "RuntimeError",
                                           r"mask must be the forward's uint8 mask on cpu, 2 bytes for 15"),
}


def run_cases(names):
    """{name: outcome dict}: the cases run in order in child processes, restarted after any that kills one."""
    outcomes, pending = {}, list(names)
    while pending:
        payload = json.dumps([(n, CASES[n][0]) for n in pending])
        child = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, timeout=600)
        started = None
        for line in child.stdout.splitlines():
            record = json.loads(line)
            if record.get("started"):
                started = record["case"]
            else:
                outcomes[record["case"]] = record
                started = None
        if started is not None:  # the child died inside this case
            died = f"signal {signal.Signals(-child.returncode).name}" if child.returncode < 0 else \
                f"exit status {child.returncode}"
            outcomes[started] = {"case": started, "crash": died, "stderr": child.stderr[-2000:]}
        elif child.returncode != 0:
            pytest.fail(f"the child failed outside any case: {child.stderr[-2000:]}")
        pending = [n for n in pending if n not in outcomes]
    return outcomes


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_a_clear_error(outcomes, name):
    _, error, match = CASES[name]
    outcome = outcomes[name]
    assert "crash" not in outcome, f"{name}: the process died ({outcome['crash']}): {outcome['stderr']}"
    assert outcome["error"] == error, f"{name}: expected {error}, got {outcome['error']}: {outcome['message']}"
    assert re.search(match, outcome["message"]), outcome["message"]


def test_a_crash_is_reported_not_fatal(monkeypatch):
    """The harness itself: a case that kills its child is recorded, and the cases after it still run."""
    monkeypatch.setitem(CASES, "dies", ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "", ""))
    monkeypatch.setitem(CASES, "after", ("raise ValueError('still here')", "", ""))
    result = run_cases(["dies", "after"])
    assert result["dies"]["crash"] == "signal SIGSEGV"
    assert result["after"]["error"] == "ValueError" and result["after"]["message"] == "still here"


def test_valid_calls_still_run(monkeypatch):
    """The setups above without the bad argument are accepted, so each case fails for its one reason."""
    ok = {"channel_clip": CC + "N.channel_clip_bwd(x, m, u, 1, False); N.channel_clip_fwd(x, u[:4], 64, False)",
          "soft_histogram": SH + "h = N.soft_histogram_fwd(z, low, nb, 1, 5, 0.1, 150.0, 4, 1.6)\n"
                                 "assert torch.allclose(h.sum(1), torch.ones(4))\n"
                                 "N.soft_histogram_bwd(g, z, low, nb, 2, 0.1, 150.0, 4, 1.6)",
          "diag_fisher_norm": DF + "N.diag_fisher_norm(dy, x, mean, r)",
          "diag_fisher_conv2d": CONV + "N.diag_fisher_conv2d(dy, x, [3, 3], [1, 1], [0, 0], [1, 1], 1)",
          "conv2d_weight_grad": RG + "N.conv2d_weight_grad(dy, x, w, [1, 1], [0, 0], [1, 1], 1, True, 2**63 - 1)"}
    for name, code in ok.items():
        monkeypatch.setitem(CASES, name, (code, None, ""))
    result = run_cases(list(ok))
    for name in ok:
        assert result[name]["error"] is None, result[name]
