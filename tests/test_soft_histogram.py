"""soft_histogram and f_divergence against the dense float64 reference, on every backend this machine runs."""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pydefend import BackendUnavailable, use_backend
from pydefend.ops.soft_histogram import (bin_layout, f_divergence, f_divergence_reference, soft_histogram,
                                         soft_histogram_reference, window)

CPU_BACKENDS = ["cpp", "reference"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# relative rounding of the gradient as stored in z's dtype
STORE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TAU_WIDTH = [(tau, w) for tau in (10.0, 150.0, 1000.0) for w in (0.05, 0.1, 0.5)]
# (shape, channel_dim, layout): conv maps, 2-D N×D, channel last, channels-last memory, a strided view
SHAPES = [((6, 5, 7, 9), 1, "contiguous"), ((300, 7), 1, "contiguous"), ((3, 11, 13), -1, "contiguous"),
          ((4, 6, 5, 3), 1, "channels_last"), ((5, 4, 6, 8), 1, "strided"), ((1, 1), 1, "contiguous")]


def make_case(shape, channel_dim, layout="contiguous", max_bins=300, width=0.1, dtype=torch.float32):
    """z spread over the bins plus values far outside them; per-channel bin counts from 1 to max_bins."""
    cd = channel_dim % len(shape)
    C = shape[cd]
    full = shape[:-1] + (shape[-1] * 2,) if layout == "strided" else shape
    z = torch.randn(full, dtype=torch.float64) * 2
    far = torch.rand(full) < 0.03
    z = torch.where(far, torch.randn(full, dtype=torch.float64).sign() * 1e4, z)
    if layout == "strided":
        z = z[..., ::2]
    elif layout == "channels_last":
        z = z.to(memory_format=torch.channels_last)
    bins = torch.randint(1, max_bins + 1, (C,))
    bins[0] = 1
    if C > 1:
        bins[1] = max_bins
    low = -torch.rand(C, dtype=torch.float64) * bins.double() * width / 2 - 0.5
    return z.to(dtype), low, bins.tolist(), cd


def tolerances(dtype, tau, low, bins, width):
    """(hist atol, grad rtol): fp32 evaluates x = τ(z - e) with e rounded to fp32, an error ~ τ·|e|·2^-24."""
    if dtype == torch.float64:
        return 1e-12, 1e-9
    edge = float(low.abs().max()) + max(bins) * width
    x_err = tau * (1 + edge) * 6e-8
    return 2 * x_err + 1e-7, 4 * x_err + 1e-6


def run(fn, z, low, width, bins, tau, cd, grad):
    za = z.detach().clone().requires_grad_()
    la = low.detach().clone().requires_grad_()
    h = fn(za, la, width, bins, tau, cd)
    h.backward(grad)
    return h.detach(), za.grad, la.grad


def check_against_reference(backend, z, low, width, bins, tau, cd):
    grad = torch.randn(len(bins), max(bins), dtype=torch.float64)
    with use_backend(backend):
        h, gz, gl = run(soft_histogram, z, low, width, bins, tau, cd, grad)
    hr, gzr, glr = run(soft_histogram_reference, z.double(), low, width, bins, tau, cd, grad)
    atol, grtol = tolerances(z.dtype, tau, low, bins, width)
    assert h.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(h.double(), hr, atol=atol, rtol=0)
    gscale = float(gzr.abs().max())
    rtol = max(grtol, STORE_RTOL[z.dtype])
    torch.testing.assert_close(gz.double(), gzr, atol=rtol * gscale + 1e-300, rtol=rtol)
    gl_scale = float(gzr.abs().sum((0,) + tuple(range(2, gzr.dim()))).max()) if gzr.dim() > 1 else gscale
    torch.testing.assert_close(gl.double(), glr, atol=grtol * gl_scale + 1e-12, rtol=grtol)
    past = torch.arange(max(bins))[None, :] >= torch.tensor(bins)[:, None]
    assert (h[past] == 0).all(), "entries past a channel's last bin are exactly 0"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tau,width", TAU_WIDTH)
@pytest.mark.parametrize("shape,channel_dim,layout", SHAPES[:3])
def test_matches_reference_tau_width(backend, tau, width, shape, channel_dim, layout):
    z, low, bins, cd = make_case(shape, channel_dim, layout, width=width)
    check_against_reference(backend, z, low, width, bins, tau, cd)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,channel_dim,layout", SHAPES)
def test_matches_reference_dtypes_layouts(backend, dtype, shape, channel_dim, layout):
    z, low, bins, cd = make_case(shape, channel_dim, layout, max_bins=120, dtype=dtype)
    check_against_reference(backend, z, low, 0.1, bins, 150.0, cd)


def test_window_sizes_and_cutoffs():
    # e^-T below half a fixed-point step: evaluating an edge outside the window would give exactly 0 or 2^F
    assert torch.sigmoid(torch.tensor(-23.0, dtype=torch.float64)) * 2**32 < 0.5
    assert torch.sigmoid(torch.tensor(-44.0, dtype=torch.float64)) * 2**62 < 0.5
    assert torch.sigmoid(torch.tensor(-22.0, dtype=torch.float64)) * 2**32 > 0.5  # 23 is the smallest integer
    assert window(150.0, 0.1, torch.float32, 300) == (23 / 15 + 1 / 64, 4)  # BNA's defaults
    assert window(150.0, 0.1, torch.float64, 300)[1] == 6
    assert window(10.0, 0.05, torch.float32, 60) == (23 / 0.5 + 1 / 64, 60)  # covers every bin
    assert window(1e-20, 1e-5, torch.float32, 7)[1] == 7


@pytest.mark.parametrize("tau,width", [(150.0, 0.1), (10.0, 0.05), (1000.0, 0.5)])
def test_window_is_exact_in_float64(tau, width):
    """The windowed float64 kernel equals the dense (every-edge) float64 evaluation to fp64 rounding."""
    z, low, bins, cd = make_case((40, 6, 5), 1, width=width, dtype=torch.float64)
    with use_backend("cpp"):
        h = soft_histogram(z, low, width, bins, tau, cd)
    with use_backend("reference"):
        dense = soft_histogram(z, low, width, bins, tau, cd)
    torch.testing.assert_close(h, dense, atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mass_is_conserved(dtype):
    z, low, bins, cd = make_case((500, 9, 6, 5), 1, dtype=dtype)
    h = soft_histogram(z, low, 0.1, bins, 150.0, cd)
    # integer fixed-point sums: only the final per-bin division rounds
    eps = torch.finfo(h.dtype).eps
    torch.testing.assert_close(h.sum(1), torch.ones(len(bins), dtype=h.dtype), atol=max(bins) * eps, rtol=0)
    assert (h >= 0).all()


def test_one_bin_has_mass_one():
    z = torch.randn(4, 3, 5)
    h = soft_histogram(z, torch.zeros(3), 0.1, 1, 150.0)
    assert h.shape == (3, 1) and (h == 1).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_far_outside_and_infinite_land_in_end_bins(backend):
    z = torch.tensor([[-1e30, -float("inf"), 1e30, float("inf"), 3e38]]).view(5, 1).requires_grad_()
    with use_backend(backend):
        h = soft_histogram(z, torch.zeros(1), 0.1, 4, 150.0)
        h.backward(torch.randn_like(h))
    assert torch.equal(h, torch.tensor([[0.4, 0.0, 0.0, 0.6]]))
    assert (z.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_makes_its_channel_nan(backend):
    z = torch.randn(8, 3)
    z[2, 1] = float("nan")
    z.requires_grad_()
    low = torch.full((3,), -3.0, requires_grad=True)
    with use_backend(backend):
        h = soft_histogram(z, low, 0.5, [12, 5, 9], 20.0)
        h.backward(torch.randn_like(h))
    assert h[1, :5].isnan().all() and (h[1, 5:] == 0).all()
    assert torch.isfinite(h[[0, 2]]).all()
    assert z.grad[2, 1].isnan() and torch.isfinite(z.grad[:, [0, 2]]).all()
    assert torch.isfinite(z.grad[[0, 1, 3, 4, 5, 6, 7], 1]).all()
    assert low.grad[1].isnan() and torch.isfinite(low.grad[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_repeats_and_thread_counts(dtype):
    z, low, bins, cd = make_case((64, 12, 9, 7), 1, dtype=dtype)
    grad = torch.randn(len(bins), max(bins), dtype=torch.float64)
    first = run(soft_histogram, z, low, 0.1, bins, 150.0, cd, grad)
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads), threads):
            torch.set_num_threads(n)
            again = run(soft_histogram, z, low, 0.1, bins, 150.0, cd, grad)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


def test_gradcheck():
    z = (torch.randn(6, 3, 4, dtype=torch.float64) * 0.6).requires_grad_()
    low = torch.tensor([-1.5, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: soft_histogram(a, b, 0.1, [30, 1, 25], 20.0), (z, low))


@pytest.mark.parametrize("kind", ["tv", "kl", "js"])
def test_gradcheck_through_divergence(kind):
    z = (torch.randn(10, 2, dtype=torch.float64) * 0.5).requires_grad_()
    low = torch.tensor([-1.2, -1.4], dtype=torch.float64, requires_grad=True)
    q = soft_histogram(torch.randn(30, 2, dtype=torch.float64), low.detach(), 0.2, [12, 14], 15.0)

    def f(a, b):
        return f_divergence(soft_histogram(a, b, 0.2, [12, 14], 15.0), q, kind)
    assert torch.autograd.gradcheck(f, (z, low))


def test_opcheck():
    z, low, bins, cd = make_case((3, 4, 5, 2), 1, "channels_last", max_bins=40)
    low = low.float()
    args = (z.requires_grad_(), low.requires_grad_(), 0.1, bins, 150.0, cd)
    torch.library.opcheck(torch.ops.pydefend.soft_histogram_fwd.default, args)
    grad = torch.randn(len(bins), max(bins))
    torch.library.opcheck(torch.ops.pydefend.soft_histogram_bwd.default,
                          (grad, z.detach(), low.detach(), 0.1, bins, 150.0, cd))
    p = torch.softmax(torch.randn(4, 9), -1).requires_grad_()
    q = torch.softmax(torch.randn(4, 9), -1).requires_grad_()
    for kind in ("tv", "kl", "js"):
        torch.library.opcheck(torch.ops.pydefend.f_divergence.default, (p, q, kind, 1e-10))
        torch.library.opcheck(torch.ops.pydefend.f_divergence_bwd.default,
                              (torch.randn(4), p.detach(), q.detach(), kind, 1e-10))


def test_compile_fullgraph_forward_backward(inductor_vector_isa):
    z, low, bins, cd = make_case((8, 4, 5, 5), 1, max_bins=60)
    low = low.float()
    q = soft_histogram(torch.randn(8, 4, 5, 5), low, 0.1, bins, 150.0)

    def f(a, b):
        return f_divergence(soft_histogram(a, b, 0.1, bins, 150.0), q, "js").sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    za, la = z.clone().requires_grad_(), low.clone().requires_grad_()
    compiled(za, la).backward()
    zb, lb = z.clone().requires_grad_(), low.clone().requires_grad_()
    f(zb, lb).backward()
    torch.testing.assert_close(za.grad, zb.grad, atol=0, rtol=0)
    torch.testing.assert_close(la.grad, lb.grad, atol=0, rtol=0)


def test_saves_only_z_and_low():
    z = torch.randn(16, 8, 6, 6, requires_grad=True)
    low = torch.full((8,), -3.0, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = soft_histogram(z, low, 0.1, 60, 150.0)
    assert sum(t.numel() * t.element_size() for t in saved) == z.numel() * 4 + low.numel() * 4
    h.sum().backward()


def test_num_bins_forms_agree():
    z = torch.randn(20, 3)
    low = torch.full((3,), -2.0)
    a = soft_histogram(z, low, 0.1, 40)
    assert torch.equal(a, soft_histogram(z, low, 0.1, [40, 40, 40]))
    assert torch.equal(a, soft_histogram(z, low, 0.1, torch.tensor([40, 40, 40])))
    assert torch.equal(a, soft_histogram(z, low.double(), 0.1, [40]))  # low is cast to z's accumulation dtype


# --------------------------------------------------------------------------- bin layout
def test_bin_layout():
    clean = torch.randn(50, 4, 3, 3)
    clean[:, 3] = 0.25  # a constant channel still gets one bin
    layout = bin_layout(clean, 0.1)
    flat = clean.transpose(0, 1).reshape(4, -1)
    assert torch.equal(layout.low, flat.amin(1))
    expected = [max(1, math.ceil((hi - lo) / 0.1)) for lo, hi in zip(flat.amin(1).double().tolist(),
                                                                      flat.amax(1).double().tolist())]
    assert layout.num_bins == expected and layout.num_bins[3] == 1 and layout.width == 0.1
    h = soft_histogram(clean, *layout, tau=150.0)
    assert h.shape == (4, max(expected))
    split = bin_layout([clean[:20], clean[20:]], 0.1)
    assert torch.equal(split.low, layout.low) and split.num_bins == layout.num_bins
    with pytest.raises(ValueError, match="NaN or inf"):
        bin_layout(torch.tensor([[1.0, float("nan")]]), 0.1)
    with pytest.raises(ValueError, match="width must be"):
        bin_layout(clean, 0.0)


def test_bin_layout_bounds_channels_times_bins_before_allocating():
    """One outlier in one channel sets every channel's row length: 64 values used to allocate 863 MiB."""
    clean = torch.zeros(64, 5)
    clean[0, 3] = 1.6e6  # 1.6e7 bins of 0.1 (under 2^24) in channel 3, so 5 x 1.6e7 = 8e7 entries > 2^26
    with pytest.raises(ValueError, match=r"bin_layout: channel 3 needs 1600000\d bins \(its values span 0 to "
                                         r"1\.6e\+06\), so the histogram of 5 channels would have 5 x 1600000\d "
                                         r"entries \(> 2\^26\)"):
        bin_layout(clean, 0.1)
    edge = torch.zeros(2, 4)
    edge[1, 2] = 2.0**24  # 4 x 2^24 = 2^26 entries: at the bound, not above it
    layout = bin_layout(edge, 1.0)
    assert layout.num_bins == [1, 1, 2**24, 1] and len(layout.num_bins) * max(layout.num_bins) == 2**26
    with pytest.raises(ValueError, match=r"channel 2 needs 33554432 bins \(> 2\^24\)"):
        bin_layout(edge, 0.5)


def test_op_bounds_channels_times_bins():
    with pytest.raises(ValueError, match=r"num_bins gives channel 1 16777216 bins, so the histogram would have 5 x "
                                         r"16777216 entries \(> 2\^26\)"):
        soft_histogram(torch.randn(4, 5), torch.zeros(5), 0.1, [3, 2**24, 1, 1, 1])


@pytest.mark.parametrize("num_bins", [7, [7], [7, 7, 7], (7, 3, 5), range(5, 8), torch.tensor([7, 3, 5]),
                                      torch.tensor(7), torch.tensor([4, 5, 6], dtype=torch.int32)])
def test_num_bins_forms(num_bins):
    z, low = torch.randn(20, 3), torch.full((3,), -2.0)
    expected = soft_histogram_reference(z.double(), low.double(), 0.1, num_bins, 150.0)
    h = soft_histogram(z, low, 0.1, num_bins)
    torch.testing.assert_close(h.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_bins,shown", [(5.0, "float 5.0"), ([5, 2.5, 3], r"list \[5, 2.5, 3\]"),
                                            (torch.tensor([5.0]), "a torch.float32 tensor"), ("5", "str '5'"),
                                            (None, "NoneType None"), (True, "bool True"),
                                            (torch.tensor([True]), "a torch.bool tensor")])
def test_num_bins_that_are_not_ints(num_bins, shown):
    z, low = torch.randn(20, 3), torch.full((3,), -2.0)
    match = f"num_bins must be an int, a sequence of ints or an integer tensor, got {shown}"
    with pytest.raises(TypeError, match=match):
        soft_histogram(z, low, 0.1, num_bins)
    with pytest.raises(TypeError, match=match):
        soft_histogram_reference(z, low, 0.1, num_bins)


def test_tau_must_be_finite_in_the_input_dtype():
    """tau > 3.4e38 passed the finite check but is inf in fp32: an element on an edge got [1, 0] and a NaN gradient."""
    z = torch.tensor([[1.0]], requires_grad=True)
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0 in torch.float32, got 1e\+39"):
        soft_histogram(z, torch.zeros(1), 1.0, 2, tau=1e39)
    with pytest.raises(ValueError, match=r"width must be a finite number > 0 in torch.float32, got 1e-50"):
        soft_histogram(z, torch.zeros(1), 1e-50, 2, tau=1e40)
    # the same tau is finite in float64: the element on the edge splits its mass, and its gradient is finite
    zd = z.detach().double().requires_grad_()
    h = soft_histogram(zd, torch.zeros(1, dtype=torch.float64), 1.0, 2, tau=1e39)
    assert h.tolist() == [[0.5, 0.5]]
    h[0, 0].backward()
    assert torch.isfinite(zd.grad).all()


def test_edges_must_be_finite_in_the_dtype():
    with pytest.raises(ValueError, match=r"channel 1's edges low \+ i \* width reach past the torch.float32 range "
                                         r"\(low = 3e\+38, 5 bins of width 1e\+37\)"):
        soft_histogram(torch.randn(4, 2), torch.tensor([0.0, 3e38]), 1e37, 5)
    z = torch.randn(4, 2, requires_grad=True)
    low = torch.tensor([0.0, 3e38], dtype=torch.float64)  # fine in float64
    soft_histogram(z.double(), low, 1e37, 5).sum().backward()


def test_double_backward_is_refused():
    """The second-order gradient used to be all zeros with only a warning (the backward ops had no autograd)."""
    z = (torch.randn(10, 2, dtype=torch.float64) * 0.5).requires_grad_()
    low = torch.tensor([-1.2, -1.4], dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 14, dtype=torch.float64, requires_grad=True)  # grad_hist depends on w

    def f():
        return (soft_histogram(z, low, 0.2, [12, 14], 15.0) * w).sum()
    first = torch.autograd.grad(f(), (z, low), create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(first, torch.autograd.grad(f(), (z, low))))
    with pytest.raises(RuntimeError, match="pydefend.soft_histogram is not twice differentiable"):
        torch.autograd.grad(first[0].square().sum() + first[1].sum(), (z, low, w))
    p = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1).requires_grad_()
    q = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1).requires_grad_()
    gp, gq = torch.autograd.grad(f_divergence(p, q, "js").sum(), (p, q), create_graph=True)
    with pytest.raises(RuntimeError, match="pydefend.f_divergence is not twice differentiable"):
        torch.autograd.grad(gp.square().sum() + gq.sum(), (p, q))


# --------------------------------------------------------------------------- f-divergences
@pytest.mark.parametrize("kind", ["tv", "kl", "js"])
def test_divergence_matches_formulas_and_handles_empty_bins(kind):
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    pa, qa = p.clone().requires_grad_(), q.clone().requires_grad_()
    d = f_divergence(pa, qa, kind)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(pa.grad).all() and torch.isfinite(qa.grad).all()
    assert d[1] == 0  # identical rows, including an empty bin
    disjoint = {"tv": 1.0, "kl": math.log(0.5 / 1e-10), "js": math.log(2)}[kind]
    assert d[0].item() == pytest.approx(disjoint, rel=1e-8)
    pr, qr = p.clone().requires_grad_(), q.clone().requires_grad_()
    f_divergence_reference(pr, qr, kind).sum().backward()
    torch.testing.assert_close(pa.grad, pr.grad)
    torch.testing.assert_close(qa.grad, qr.grad)
    padded = f_divergence(torch.cat([p, torch.zeros(3, 5, dtype=p.dtype)], 1),
                          torch.cat([q, torch.zeros(3, 5, dtype=q.dtype)], 1), kind)
    torch.testing.assert_close(padded, d.detach(), atol=0, rtol=0)  # zeros past the last bin change nothing


@pytest.mark.parametrize("kind", ["tv", "kl", "js"])
def test_divergence_gradcheck(kind):
    p = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1).requires_grad_()
    q = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: f_divergence(a, b, kind), (p, q))


def test_divergence_bad_input():
    p = torch.rand(2, 3)
    with pytest.raises(ValueError, match="unknown kind"):
        f_divergence(p, p, "hellinger")
    with pytest.raises(ValueError, match="one shape"):
        f_divergence(p, torch.rand(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        f_divergence(p, p.double())
    with pytest.raises(ValueError, match="eps must be"):
        f_divergence(p, p, "kl", eps=0.0)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_bins=0), ValueError, "num_bins must be in"),
    (dict(num_bins=[5, 0, 3]), ValueError, "num_bins must be in"),
    (dict(num_bins=[5, 5]), ValueError, "expected 1 or 3"),
    (dict(tau=0.0), ValueError, "tau must be"),
    (dict(tau=-1.0), ValueError, "tau must be"),
    (dict(tau=float("nan")), ValueError, "tau must be"),
    (dict(width=0.0), ValueError, "width must be"),
    (dict(width=-0.1), ValueError, "width must be"),
    (dict(width=float("inf")), ValueError, "width must be"),
    (dict(low=torch.zeros(4)), ValueError, "expected \\(3,\\)"),
    (dict(low=torch.tensor([0.0, float("nan"), 0.0])), ValueError, "low contains NaN"),
    (dict(channel_dim=2), ValueError, "out of range"),
    (dict(z=torch.ones(4, 3, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(z=torch.randn(0, 3)), ValueError, "no elements per channel"),
    (dict(z=torch.randn(4, 3), low=torch.zeros(3, device="meta")), ValueError, "is on cpu but low is on meta"),
])
def test_bad_input(kwargs, error, match):
    args = dict(z=torch.randn(4, 3), low=torch.zeros(3), width=0.1, num_bins=5, tau=150.0, channel_dim=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        if "low" in kwargs and kwargs["low"].device.type == "meta":
            torch.ops.pydefend.soft_histogram_fwd(args["z"], args["low"], 0.1, [5], 150.0, 1)
        else:
            soft_histogram(**args)


def test_low_dtype_is_checked_by_the_op():
    with pytest.raises(TypeError, match="low must be torch.float32"):
        torch.ops.pydefend.soft_histogram_fwd(torch.randn(4, 3), torch.zeros(3, dtype=torch.float64), 0.1, [5],
                                              150.0, 1)


def test_forced_backend_that_cannot_run_says_why():
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda does not run cpu tensors"):
        soft_histogram(torch.randn(4, 3), torch.zeros(3), 0.1, 5)


# --------------------------------------------------------------------------- CUDA source
def test_cuda_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernels cannot be compile-checked on this machine")
    source = Path(__file__).parents[1] / "csrc" / "cuda" / "soft_histogram.cu"
    result = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", "-Werror", "all-warnings", str(source),
                             "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
