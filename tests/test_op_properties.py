"""Property-based tests (hypothesis) of the four fused ops against float64 oracles written here, independently
of the ops' code: shapes (size-1 and empty dims where allowed), dtypes, strides (permuted, sliced and expanded
views), NaN/inf where the op documents what happens, and ties (values on clip bounds and bin edges, equal |ΔW|).

Every tensor is drawn by hypothesis (values, or a seed for the few that are not), so a failure shrinks and
replays from the printed blob. The example budget comes from the profiles in conftest.py: "ci" by default,
`--hypothesis-profile=thorough` for a long local run. Triton is not run here (it needs TRITON_INTERPRET=1).
"""
import math
from decimal import ROUND_HALF_UP, Decimal

import pytest

hypothesis = pytest.importorskip("hypothesis")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from pydefend import use_backend  # noqa: E402
from pydefend.ops.channel_clip import channel_clip, channel_clip_reference  # noqa: E402
from pydefend.ops.diag_fisher import DiagFisher, diag_fisher_conv2d, diag_fisher_linear, diag_fisher_norm  # noqa: E402
from pydefend.ops.neuron_l1 import ZeroRecord, neuron_l1_change, select_and_zero  # noqa: E402
from pydefend.ops.soft_histogram import f_divergence, soft_histogram  # noqa: E402

NAN, INF = float("nan"), float("inf")
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ALL_DTYPES = [F64, F32, F16, BF16]
BACKENDS = st.sampled_from(["cpp", "reference", "auto"])  # "auto": what a plain call picks (cpp on a CPU)


def budget(weight):
    """This test's examples: `weight` times the active profile's max_examples (the profiles are in conftest.py).
    Under "ci" the weights give each op 5-15 s on an idle 2-core machine and under 30 s on a busy one (the
    multi-threaded Fisher kernels slow down the most when the cores are shared)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * weight)))


def acc_dtype(dtype):
    return F64 if dtype == F64 else F32


# --------------------------------------------------------------------------- drawing tensors
def shapes(min_dims, max_dims, min_side=0, max_side=5, max_numel=240):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side).filter(
        lambda s: math.prod(s) <= max_numel) if max_dims > 0 else st.just(())


def floats(shape, lo=-4.0, hi=4.0):
    """A float64 tensor of `shape` with values in [lo, hi] (hypothesis's nasty floats included)."""
    return hnp.arrays(np.float64, shape, elements=st.floats(lo, hi)).map(torch.from_numpy)


def specials(shape, values, none=15):
    """(values, where): per element, whether one of `values` replaces it and which (with `put`); about
    len(values) / (none + len(values)) of the elements, shrinking towards none."""
    codes = hnp.arrays(np.int8, shape, elements=st.integers(0, none + len(values) - 1))

    def pick(c):
        c = torch.from_numpy(c).long()
        table = torch.tensor([NAN] * none + list(values), dtype=torch.float64)
        return table[c], c >= none
    return codes.map(pick)


def put(base, special):
    values, where = special
    return torch.where(where, values, base)


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


@st.composite
def layouts(draw, shape, expand=True):
    """A memory layout for a tensor of `shape`: contiguous, permuted (any dim order, channels-last included),
    sliced (a strided view into a NaN-filled buffer, so a kernel reading between elements sees NaN) or expanded
    (stride 0 along a dim; its values become copies of the first slice)."""
    kinds = ["contiguous"] + (["permuted", "sliced"] + (["expanded"] if expand else []) if len(shape) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "permuted":
        return kind, draw(st.permutations(range(len(shape))))
    if kind == "sliced":
        return kind, draw(st.integers(0, len(shape) - 1)), draw(st.integers(2, 3)), draw(st.integers(0, 1))
    if kind == "expanded":
        return kind, draw(st.integers(0, len(shape) - 1))
    return (kind,)


def lay_out(t, layout):
    """t's values (in t's dtype) in the given layout, as a new leaf tensor."""
    kind = layout[0]
    if kind == "permuted":
        perm = layout[1]
        return t.permute(perm).contiguous().permute(_inverse(perm))
    if kind == "sliced":
        _, d, step, offset = layout
        big = list(t.shape)
        big[d] = t.shape[d] * step + offset
        buf = torch.full(big, NAN, dtype=t.dtype)
        index = [slice(None)] * t.dim()
        index[d] = slice(offset, offset + t.shape[d] * step, step)
        view = buf[tuple(index)]
        view.copy_(t)
        return view
    if kind == "expanded" and t.shape[layout[1]] > 0:
        return t.narrow(layout[1], 0, 1).clone().expand(t.shape)
    return t.clone()


def assert_within(got, want, bound, rtol, what):
    """|got - want| <= rtol * bound (+ the smallest normal number of got's dtype) elementwise, where `bound` is
    the same computation on absolute values (so cancellation inside a sum is allowed for), with identical NaN and
    inf entries."""
    tiny = torch.finfo(got.dtype).tiny  # results below the dtype's normal range may underflow (to 0)
    got, want, bound = got.double(), want.double(), bound.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().tolist()}, " \
                                                    f"expected at {want.isnan().nonzero().tolist()}"
    infinite = want.isinf()
    assert torch.equal(got[infinite], want[infinite]), f"{what}: infinite entries differ"
    finite = torch.isfinite(want)
    err = (got - want).abs()[finite]
    tol = (rtol * (bound.abs() + want.abs()))[finite] + tiny
    if err.numel() and not (err <= tol).all():
        i = int((err - tol).argmax())
        raise AssertionError(f"{what}: |got - want| = {err[i]:.3e} > tolerance {tol[i]:.3e} (got {got[finite][i]!r}, "
                             f"want {want[finite][i]!r}, rtol {rtol})")


def exact(got, want, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


# =========================================================================== channel_clip
# grad_upper is a sum: fp32 accumulation, then rounding to the dtype (y and grad_x are exact selections)
CLIP_RTOL = {F64: 1e-12, F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}


@st.composite
def clip_cases(draw):
    shape = draw(shapes(1, 4))
    ndim = len(shape)
    dtype = draw(st.sampled_from(ALL_DTYPES))
    cd = draw(st.integers(-ndim, ndim - 1))
    per_element = ndim >= 3 and draw(st.booleans())  # (for a 2-D x, per channel along dim 1 is per element)
    u_shape = tuple(shape[1:]) if per_element else (shape[cd],)
    upper = put(draw(floats(u_shape, -3, 3)), draw(specials(u_shape, [INF, -INF, 0.0], none=12))).to(dtype)
    x = put(draw(floats(shape)), draw(specials(shape, [0.0, -0.0, NAN, INF, -INF])))
    # ties: elements exactly on their bound (the bound as rounded to the dtype)
    tie = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    x = torch.where(tie, _bound(upper.double(), shape, cd).expand(shape), x).to(dtype)
    dy = draw(floats(shape, -2, 2)).to(dtype)
    return dict(x=x, upper=upper, dy=dy, cd=cd, relu=draw(st.booleans()),
                x_layout=draw(layouts(shape)), u_layout=draw(layouts(u_shape, expand=False)),
                dy_layout=draw(layouts(shape)))


def _bound(upper, shape, cd):
    """upper viewed against x: a 1-D upper per channel along dim cd, else per element (shape x.shape[1:])."""
    cd %= len(shape)
    if upper.dim() == 1:
        view = [1] * len(shape)
        view[cd] = -1
        return upper.view(view)
    return upper.unsqueeze(0)


def clip_oracle(x, upper, dy, cd, relu):
    """The documented op in float64: y = min(r, u), r = x or max(x, 0); clipped when r >= u (ties go to the
    bound); NaN in x passes through with its gradient; dupper sums dy over clipped elements."""
    x, dy = x.double(), dy.double()
    u = _bound(upper.double(), x.shape, cd).expand(x.shape)
    r = torch.where(x <= 0, torch.zeros_like(x), x) if relu else x
    clipped = r >= u
    y = torch.where(clipped, u, r)
    passed = ~clipped & ~(x <= 0) if relu else ~clipped
    gx = torch.where(passed, dy, torch.zeros_like(dy))
    on_bound = torch.where(clipped, dy, torch.zeros_like(dy))
    per_channel = upper.dim() == 1
    reduce = tuple(d for d in range(x.dim()) if d != cd % x.dim()) if per_channel else (0,)
    if not reduce:  # a 1-d x: one bound per element already (sum over () would reduce every dim)
        return y, gx, on_bound, on_bound.abs()
    gu = on_bound.sum(reduce).reshape(upper.shape)
    bound = on_bound.abs().sum(reduce).reshape(upper.shape)
    return y, gx, gu, bound


@budget(3)
@given(case=clip_cases(), backend=BACKENDS)
def test_channel_clip_properties(case, backend):
    x, upper, dy, cd, relu = case["x"], case["upper"], case["dy"], case["cd"], case["relu"]
    note(f"x={x!r}\nupper={upper!r}\ndy={dy!r}")
    xa = lay_out(x, case["x_layout"]).requires_grad_()
    ua = lay_out(upper, case["u_layout"]).requires_grad_()
    dy = lay_out(dy, case["dy_layout"])  # (an expanded layout changes the values: the oracles see the new ones)
    with use_backend(backend):
        y = channel_clip(xa, ua, cd, relu)
        y.backward(dy)
    yr, gxr, gur, bound = clip_oracle(xa.detach(), upper, dy, cd, relu)
    assert y.dtype == x.dtype and xa.grad.dtype == x.dtype and ua.grad.dtype == upper.dtype
    exact(y, yr, "y")
    exact(xa.grad, gxr, "grad_x")
    assert_within(ua.grad, gur, bound, CLIP_RTOL[x.dtype], "grad_upper")
    # the oracle is min(r, u) (torch.minimum propagates NaN as the op documents) ...
    xd = xa.detach().double()
    r = xd.clamp_min(0) if relu else xd
    exact(yr, torch.minimum(r, _bound(upper.double(), x.shape, cd).expand(x.shape)), "oracle vs torch.minimum")
    # ... and agrees with the op's own float64 reference, gradients included
    xr = xd.clone().requires_grad_()
    ur = upper.double().requires_grad_()
    ref = channel_clip_reference(xr, ur, cd, relu)
    ref.backward(dy.double())
    exact(ref, yr, "float64 reference y")
    exact(xr.grad, gxr, "float64 reference grad_x")
    assert_within(ur.grad, gur, bound, 1e-12, "float64 reference grad_upper")


@budget(0.25)
@given(shape=shapes(2, 3, min_side=1), data=st.data())
def test_channel_clip_nan_bound_is_rejected(shape, data):
    upper = data.draw(floats((shape[1],), -2, 2))
    upper[data.draw(st.integers(0, shape[1] - 1))] = NAN
    with pytest.raises(ValueError, match="upper contains NaN"):
        channel_clip(data.draw(floats(shape)), upper)


# =========================================================================== soft_histogram
# relative rounding of the gradient as stored in z's dtype
HIST_STORE_RTOL = {F64: 1e-12, F32: 1e-6, F16: 2e-3, BF16: 1.6e-2}
HIST_CUTOFF = {F64: 44.0, F32: 23.0}  # the window's T (module docstring): omitted edges have sigma' < e^-T


@st.composite
def hist_cases(draw):
    shape = draw(shapes(1, 4, min_side=1, max_numel=150))
    ndim = len(shape)
    cd = draw(st.integers(-ndim, ndim - 1))
    C = shape[cd % ndim]
    dtype = draw(st.sampled_from(ALL_DTYPES))
    width = draw(st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]) | st.floats(0.01, 2.0))
    tau = draw(st.sampled_from([1.0, 10.0, 20.0, 150.0, 1000.0]) | st.floats(0.5, 2000.0))
    one = draw(st.booleans())
    bins = [draw(st.integers(1, 40))] * C if one else draw(st.lists(st.integers(1, 40), min_size=C, max_size=C))
    low = draw(floats((C,), -3.0, 0.5)).to(acc_dtype(dtype))
    # z per element: a position in its channel's bins (slightly beyond both ends too), or exactly on an edge
    # (a tie: i * width past low, i = 0..M), or far away / infinite / NaN
    pos = draw(floats(shape, -0.2, 1.2))
    edge = torch.from_numpy(draw(hnp.arrays(np.int8, shape, elements=st.integers(-1, 40)))).double()
    index = [1] * ndim
    index[cd % ndim] = -1
    lo = low.double().view(index)
    m = torch.tensor(bins, dtype=torch.float64).view(index)
    z = torch.where(edge >= 0, lo + torch.minimum(edge, m) * width, lo + pos * m * width)
    z = put(z, draw(specials(shape, [1e4, -1e4, INF, -INF, NAN], none=25))).to(dtype)
    g = draw(floats((C, max(bins)), -2, 2)).to(acc_dtype(dtype))
    return dict(z=z, low=low, width=width, bins=bins[0] if one else bins, tau=tau, cd=cd, g=g,
                z_layout=draw(layouts(shape)))


def hist_oracle(z, low, width, bins, tau, cd):
    """BNA eqs. 5-6 in float64, written out: with s_i = sigmoid(tau (z - low - i width)), s_0 = 1, s_M = 0,
    p[c, k] = mean_n s_k - s_{k+1} for k < M_c and 0 past the channel's last bin."""
    z = z.double()
    cd %= z.dim()
    C = z.shape[cd]
    zc = z.movedim(cd, 0).reshape(C, -1)
    rows = []
    for c in range(C):
        mc = bins[c]
        s = [torch.ones_like(zc[c])]
        s += [torch.sigmoid(tau * (zc[c] - (low[c] + i * width))) for i in range(1, mc)]
        s += [torch.zeros_like(zc[c])]
        p = torch.stack([(s[k] - s[k + 1]).mean() for k in range(mc)])
        rows.append(torch.cat([p, p.new_zeros(max(bins) - mc)]))
    return torch.stack(rows)


def hist_grad_size(z, low, width, bins, tau, cd, g, eps):
    """Per element, the size of what its gradient sums, tau/N' sum_i (sigma'(tau (z - b_i)) + eps) |g[i] - g[i-1]|:
    the terms can cancel, and each sigma' = s (1 - s) may be off by about eps (the dtype's) when s is near 1."""
    z = z.double()
    cd %= z.dim()
    zc = z.movedim(cd, 0).reshape(z.shape[cd], -1)
    size = torch.zeros_like(zc)
    for c in range(zc.shape[0]):
        for i in range(1, bins[c]):
            s = torch.sigmoid(tau * (zc[c] - (low[c] + i * width)))
            size[c] += (s * (1 - s) + eps) * float((g[c, i] - g[c, i - 1]).abs())
    size = (size * tau / zc.shape[1]).nan_to_num(0.0)
    return size.reshape(z.movedim(cd, 0).shape).movedim(0, cd), size.sum(1)


@budget(2)
@given(case=hist_cases(), backend=BACKENDS)
def test_soft_histogram_properties(case, backend):
    z, low, width, bins, tau, cd, g = (case[k] for k in ("z", "low", "width", "bins", "tau", "cd", "g"))
    note(f"z={z!r}\nlow={low!r}\nwidth={width!r} bins={bins!r} tau={tau!r} cd={cd}")
    per_channel = bins if isinstance(bins, list) else [bins] * low.numel()
    za = lay_out(z, case["z_layout"]).requires_grad_()
    nan_rows = za.detach().isnan().movedim(cd % z.dim(), 0).reshape(low.numel(), -1).any(1)
    la = low.clone().requires_grad_()
    with use_backend(backend):
        h = soft_histogram(za, la, width, bins, tau, cd)
        h.backward(g)
    zr = za.detach().double().requires_grad_()
    lr = low.double().requires_grad_()
    hr = hist_oracle(zr, lr, width, per_channel, tau, cd)
    if hr.requires_grad:  # one bin everywhere: a constant histogram
        torch.autograd.backward(hr, g.double())
    zr.grad = torch.zeros_like(zr) if zr.grad is None else zr.grad
    lr.grad = torch.zeros_like(lr) if lr.grad is None else lr.grad
    acc = acc_dtype(z.dtype)
    assert h.dtype == acc and la.grad.dtype == acc and za.grad.dtype == z.dtype
    assert h.shape == (low.numel(), max(per_channel))
    # tolerances of tests/test_soft_histogram.py: fp32 evaluates tau (z - e) with e rounded, ~ tau |e| 2^-24
    if z.dtype == F64:
        atol, grtol = 1e-12, 1e-9
    else:
        x_err = tau * (1 + float(low.abs().max()) + max(per_channel) * width) * 6e-8
        atol, grtol = 2 * x_err + 1e-7, 4 * x_err + 1e-6
    assert_within(h, hr, torch.full_like(hr, atol / grtol), grtol, "histogram")  # |err| <= atol (+ rtol |want|)
    # gradients: the kernel's window leaves out edges whose sigma' < e^-T, tau/N' e^-T |dg| each at most
    n_per = z.numel() // low.numel()
    floor = tau / n_per * math.exp(-HIST_CUTOFF[acc]) * 4 * max(per_channel) * float(g.abs().max().double())
    rtol = max(grtol, HIST_STORE_RTOL[z.dtype])
    size, channel_size = hist_grad_size(zr.detach(), low.double(), width, per_channel, tau, cd, g.double(),
                                        4 * torch.finfo(acc).eps / grtol)
    assert_within(za.grad, zr.grad, size + floor / rtol, rtol, "grad_z")
    assert_within(la.grad, lr.grad, channel_size + n_per * floor / grtol, grtol, "grad_low")
    past = torch.arange(h.shape[1])[None, :] >= torch.tensor(per_channel)[:, None]
    assert (h.detach()[past] == 0).all(), "entries past a channel's last bin are exactly 0"
    if backend != "reference":  # the kernels' fixed-point sums: mass exactly 1 per channel (NaN rows aside)
        ok = ~h.detach().isnan().any(1)
        mass = h.detach()[ok].sum(1)
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=max(per_channel) * torch.finfo(acc).eps, rtol=0)
        assert (h.detach()[ok] >= 0).all()


@budget(0.25)
@given(shape=shapes(2, 3, min_side=0), data=st.data())
def test_soft_histogram_empty_input_is_rejected(shape, data):
    assume(math.prod(shape) == 0)
    with pytest.raises(ValueError, match="no elements per channel"):
        soft_histogram(torch.zeros(shape), torch.zeros(shape[1]), 0.1, data.draw(st.integers(1, 5)))


@st.composite
def divergence_cases(draw):
    rows, k = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(ALL_DTYPES))

    def histograms():
        mass = put(draw(floats((rows, k), 0.0, 1.0)), draw(specials((rows, k), [0.0], none=2)))
        total = mass.sum(1, keepdim=True)
        return torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), mass)
    p = histograms()
    q = torch.where(torch.from_numpy(draw(hnp.arrays(np.bool_, (rows, k)))), p, histograms())  # ties p == q
    return p.to(dtype), q.to(dtype), draw(st.sampled_from(["tv", "kl", "js"])), draw(st.sampled_from([1e-10, 1e-6]))


def divergence_oracle(p, q, kind, eps):
    def xlog(a):
        return a * torch.log(a + eps)
    if kind == "tv":
        terms, size = 0.5 * (p - q).abs(), 0.5 * (p.abs() + q.abs())
    elif kind == "kl":
        terms, size = p * torch.log(p + eps) - p * torch.log(q + eps), xlog(p).abs() + (p * torch.log(q + eps)).abs()
    else:
        parts = 0.5 * xlog(p), 0.5 * xlog(q), -xlog(0.5 * (p + q))
        terms, size = sum(parts), sum(t.abs() for t in parts)
    return terms.sum(-1), size.sum(-1)  # the divergence and the size of what it sums (for tolerances)


@budget(1)
@given(case=divergence_cases(), data=st.data())
def test_f_divergence_properties(case, data):
    p, q, kind, eps = case
    g = data.draw(floats((p.shape[0],), -2, 2)).to(p.dtype)
    pa, qa = p.clone().requires_grad_(), q.clone().requires_grad_()
    d = f_divergence(pa, qa, kind, eps)
    d.backward(g)
    pr, qr = p.double().requires_grad_(), q.double().requires_grad_()
    dr, bound = divergence_oracle(pr, qr, kind, eps)
    dr.backward(g.double())
    rtol = {F64: 1e-12, F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}[p.dtype]  # half types: float32, rounded once
    assert d.dtype == p.dtype and torch.isfinite(d).all(), "finite, empty bins included"
    assert_within(d, dr, bound, rtol, "divergence")
    # each gradient entry is g times a few logs (or p / (q + eps), its own size): rounding scales with those
    with torch.no_grad():
        pd, qd = p.double(), q.double()
        logs = sum(torch.log(t + eps).abs() for t in (pd, qd, 0.5 * (pd + qd))) + 2
        gsize = g.double().abs().unsqueeze(-1) * logs
    for got, want, name in ((pa.grad, pr.grad, "grad_p"), (qa.grad, qr.grad, "grad_q")):
        # finite wherever the dtype can hold the true value (KL's p / (q + eps) exceeds float16's range)
        fits = want.abs() <= torch.finfo(p.dtype).max
        assert torch.isfinite(got[fits]).all() and (got[~fits] == want[~fits].sign() * math.inf).all(), name
        assert_within(got[fits], want[fits], gsize.expand_as(want)[fits], rtol, name)
    assert (f_divergence(p, p, kind, eps) == 0).all(), "D(p || p) is exactly 0"


# =========================================================================== neuron_l1_change
# fp32 accumulation (fp64 for float64) of already-rounded values, then an fp32 output
L1_RTOL = {F32: 2e-5, F16: 2e-5, BF16: 2e-5, F64: 2e-7}
DELTAS = [0.0, 0.25, -0.25, 0.5, 1.0, -1.0]


@st.composite
def l1_pairs(draw):
    shape = draw(shapes(0, 4, max_numel=200))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    a = put(draw(floats(shape)), draw(specials(shape, [NAN, INF, -INF, 0.0], none=25)))
    delta = put(draw(floats(shape, -2, 2)), draw(specials(shape, DELTAS, none=4)))  # equal |ΔW| too
    b = put(a - delta, draw(specials(shape, [NAN, INF], none=30)))
    return a.to(dtype), b.to(dtype), draw(layouts(shape)), draw(layouts(shape)), draw(st.booleans())


def l1_oracle(a, b):
    rows, cols = (1, 1) if a.dim() == 0 else (a.shape[0], math.prod(a.shape[1:]))
    d = (a.double() - b.double()).abs().reshape(rows, cols)
    return d.sum(1), d.nan_to_num(0.0, posinf=0.0).sum(1)


@budget(1)
@given(pairs=st.lists(l1_pairs(), min_size=1, max_size=5), backend=BACKENDS)
def test_neuron_l1_change_properties(pairs, backend):
    a = [lay_out(x, la).requires_grad_(rg) for x, _, la, _, rg in pairs]
    b = [lay_out(y, lb) for _, y, _, lb, _ in pairs]
    with use_backend(backend):
        out = neuron_l1_change(a, b)
        again = neuron_l1_change([x.contiguous() for x in a], [y.contiguous() for y in b])
    assert len(out) == len(pairs)
    for j, (o, x, y, o2) in enumerate(zip(out, a, b, again)):
        want, bound = l1_oracle(x, y)
        assert o.dtype == F32 and not o.requires_grad, f"pair {j}: {o.dtype}, requires_grad={o.requires_grad}"
        assert_within(o, want.to(F32), bound, L1_RTOL[x.dtype], f"pair {j} ({x.dtype}, {tuple(x.shape)})")
        # strided inputs are copied to a contiguous layout first: the same bits as contiguous inputs
        exact(o, o2, f"pair {j}: strided vs contiguous")


# --------------------------------------------------------------------------- select_and_zero
def count(fraction, total):
    """round(fraction * total), halves up, on the decimal value written (the docstring's rule)."""
    return int((Decimal(repr(float(fraction))) * total).to_integral_value(ROUND_HALF_UP))


def select_oracle(bd, ul, n, m, mode):
    """The documented rule, dense: rank neurons by NWC (NaN largest; ties by layer order, then index), take the
    top round(n * neurons); zero the round(m * ...) largest |ΔW| (NaN largest) among their pooled weights
    (global; ties in (layer, neuron, index) order) or within each selected neuron (per_neuron; ties by index)."""
    names = list(bd)
    diffs = {k: (bd[k].double() - ul[k].double()).abs().reshape(bd[k].shape[0], -1) for k in names}
    nwc = torch.cat([diffs[k].sum(1) for k in names]).float()
    neurons = [(k, r) for k in names for r in range(bd[k].shape[0])]
    order = torch.sort(nwc, descending=True, stable=True).indices[:count(n, len(neurons))].tolist()
    chosen = sorted(order)  # (layer, neuron) order, as `neurons` is
    masks = {k: torch.zeros_like(diffs[k], dtype=torch.bool) for k in names}
    if mode == "per_neuron":
        for g in chosen:
            k, r = neurons[g]
            j = count(m, diffs[k].shape[1])
            masks[k][r, torch.sort(diffs[k][r], descending=True, stable=True).indices[:j]] = True
    elif chosen:
        pooled = torch.cat([diffs[neurons[g][0]][neurons[g][1]] for g in chosen])
        top = torch.zeros(pooled.numel(), dtype=torch.bool)
        top[torch.sort(pooled, descending=True, stable=True).indices[:count(m, pooled.numel())]] = True
        start = 0
        for g in chosen:
            k, r = neurons[g]
            masks[k][r] = top[start:start + diffs[k].shape[1]]
            start += diffs[k].shape[1]
    records = [(neurons[g][0], neurons[g][1], float(nwc[g]), int(masks[neurons[g][0]][neurons[g][1]].sum()))
               for g in order]
    return {k: masks[k].view(bd[k].shape) for k in names}, records


@st.composite
def selection_cases(draw):
    """Weights on a 1/4 grid (exact in every dtype, so |ΔW| and NWC are exact and tie often), NaN sometimes."""
    layers = {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.sampled_from([(draw(st.integers(1, 5)), draw(st.integers(1, 6))),
                                      (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                                       draw(st.integers(1, 2)))]))
        dtype = draw(st.sampled_from(ALL_DTYPES))
        grid = hnp.arrays(np.int8, shape, elements=st.integers(-12, 12))
        bd = torch.from_numpy(draw(grid)).double() / 4
        ul = bd - torch.from_numpy(draw(hnp.arrays(np.int8, shape, elements=st.integers(-4, 4)))).double() / 4
        ul = put(ul, draw(specials(shape, [NAN], none=40)))
        layers[f"layer{i}"] = (bd.to(dtype), ul.to(dtype))
    fractions = st.sampled_from([0.0, 0.15, 0.7, 0.5, 1 / 3, 1.0]) | st.floats(0.0, 1.0)
    return layers, draw(fractions), draw(fractions), draw(st.sampled_from(["global", "per_neuron"]))


def same_record(got, want):
    layer, neuron, nwc, zeroed = want
    return (isinstance(got, ZeroRecord) and (got.layer, got.neuron, got.zeroed) == (layer, neuron, zeroed)
            and (got.nwc == nwc or (math.isnan(got.nwc) and math.isnan(nwc))))


@budget(1)
@given(case=selection_cases(), backend=BACKENDS)
def test_select_and_zero_properties(case, backend):
    layers, n, m, mode = case
    bd = {k: v[0].clone() for k, v in layers.items()}
    ul = {k: v[1].clone() for k, v in layers.items()}
    masks, want = select_oracle(bd, ul, n, m, mode)
    with use_backend(backend):
        got = select_and_zero(bd, ul, n=n, m=m, mode=mode)
    assert len(got) == len(want) and all(same_record(g, w) for g, w in zip(got, want)), (got, want)
    for k, (b0, u0) in layers.items():
        exact(bd[k], torch.where(masks[k], torch.zeros_like(b0), b0), f"{k} after zeroing")
        exact(ul[k], u0, f"{k} of the unlearned model (never touched)")


# =========================================================================== diag_fisher
# every dtype accumulates in fp32 (fp64 for float64) on already-rounded values
FISHER_RTOL = {F64: 1e-10, F32: 2e-5, F16: 2e-5, BF16: 2e-5}


@st.composite
def norm_cases(draw):
    n, a, p, b = (draw(st.integers(lo, hi)) for lo, hi in ((0, 4), (1, 3), (1, 6), (1, 5)))
    sp = draw(st.sampled_from([d for d in range(1, p + 1) if p % d == 0]))  # stat groups: a divisor of P
    stats = (draw(st.sampled_from(sorted({1, n}) if n else [1])), draw(st.sampled_from(sorted({1, a}))), sp)
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = (n, a, p, b)
    x, dy = draw(floats(shape, -3, 3)).to(dtype), draw(floats(shape, -3, 3)).to(dtype)
    mean = draw(floats(stats, -2, 2)).to(acc_dtype(dtype))
    invstd = draw(floats(stats, 0.1, 3)).to(acc_dtype(dtype))
    return dy, x, mean, invstd, draw(layouts(shape)), draw(layouts(shape))


@budget(1)
@given(case=norm_cases(), backend=BACKENDS)
def test_diag_fisher_norm_properties(case, backend):
    dy, x, mean, invstd, dy_layout, x_layout = case
    dy, x = lay_out(dy, dy_layout), lay_out(x, x_layout)
    with use_backend(backend):
        fw, fb = diag_fisher_norm(dy, x, mean, invstd)
    assert fw.dtype == fb.dtype == acc_dtype(x.dtype)
    # per-sample affine gradients in float64: g_gamma[n, p] = sum dy (x - mean) invstd, g_beta[n, p] = sum dy
    group = x.shape[2] // mean.shape[2]
    m = mean.double().repeat_interleave(group, 2).unsqueeze(-1)
    r = invstd.double().repeat_interleave(group, 2).unsqueeze(-1)
    d, xd = dy.double(), x.double()
    gw, gb = (d * (xd - m) * r).sum((1, 3)), d.sum((1, 3))
    bw, bb = (d.abs() * (xd.abs() + m.abs()) * r).sum((1, 3)), d.abs().sum((1, 3))
    rtol = FISHER_RTOL[x.dtype]
    assert_within(fw, gw.square().sum(0), bw.square().sum(0), rtol, "Fisher of the norm weight")
    assert_within(fb, gb.square().sum(0), bb.square().sum(0), rtol, "Fisher of the norm bias")


@st.composite
def linear_cases(draw):
    n = draw(st.integers(0, 4))
    mid = draw(st.lists(st.integers(1, 3), max_size=2))
    i, o = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    xs, gs = (n, *mid, i), (n, *mid, o)
    return (draw(floats(gs, -3, 3)).to(dtype), draw(floats(xs, -3, 3)).to(dtype), draw(layouts(gs)),
            draw(layouts(xs)))


@budget(1)
@given(case=linear_cases(), backend=BACKENDS)
def test_diag_fisher_linear_properties(case, backend):
    dy, x, dy_layout, x_layout = case
    dy, x = lay_out(dy, dy_layout), lay_out(x, x_layout)
    with use_backend(backend):
        fw, fb = diag_fisher_linear(dy, x)
    n, length = x.shape[0], math.prod(x.shape[1:-1])
    gs, xs = dy.double().reshape(n, length, dy.shape[-1]), x.double().reshape(n, length, x.shape[-1])
    per_sample = torch.einsum("nlo,nli->noi", gs, xs)  # G_n = dy_n^T x_n
    bound = torch.einsum("nlo,nli->noi", gs.abs(), xs.abs())
    assert fw.dtype == fb.dtype == acc_dtype(x.dtype)
    rtol = FISHER_RTOL[x.dtype]
    assert_within(fw, per_sample.square().sum(0), bound.square().sum(0), rtol, "Fisher of the linear weight")
    assert_within(fb, gs.sum(1).square().sum(0), gs.abs().sum(1).square().sum(0), rtol, "Fisher of the linear bias")


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    c, o = groups * draw(st.integers(0, 2)), groups * draw(st.integers(1, 2))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # input large enough for one output position: H + 2p >= d (k - 1) + 1
    hw = [draw(st.integers(max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]), max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + 5))
          for i in range(2)]
    out = [(hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    n = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(ALL_DTYPES))
    xs, gs = (n, c, *hw), (n, o, *out)
    x, dy = draw(floats(xs, -3, 3)).to(dtype), draw(floats(gs, -3, 3)).to(dtype)
    return dy, x, (k, s, p, d, groups), draw(layouts(gs)), draw(layouts(xs))


def conv_per_sample(dy, x, k, s, p, d, groups):
    """Per-sample (weight, bias) gradients of <conv2d(x_n), dy_n> in float64 via torch.func.vmap(grad)."""
    n, c = x.shape[:2]
    o = dy.shape[1]
    if n == 0 or c == 0:
        return torch.zeros(n, o, c // groups, *k, dtype=F64), dy.sum((2, 3))
    w, b = torch.zeros(o, c // groups, *k, dtype=F64), torch.zeros(o, dtype=F64)

    def inner(w, b, xi, dyi):
        return (F.conv2d(xi[None], w, b, s, p, d, groups) * dyi[None]).sum()
    return vmap(grad(inner, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, b, x, dy)


@budget(0.4)
@given(case=conv_cases(), backend=BACKENDS)
def test_diag_fisher_conv2d_properties(case, backend):
    dy, x, args, dy_layout, x_layout = case
    dy, x = lay_out(dy, dy_layout), lay_out(x, x_layout)
    with use_backend(backend):
        fw, fb = diag_fisher_conv2d(dy, x, *args)
    gw, gb = conv_per_sample(dy.double(), x.double(), *args)
    bw, bb = conv_per_sample(dy.double().abs(), x.double().abs(), *args)
    assert fw.dtype == fb.dtype == acc_dtype(x.dtype)
    rtol = FISHER_RTOL[x.dtype]
    assert_within(fw, gw.square().sum(0), bw.square().sum(0), rtol, "Fisher of the conv weight")
    assert_within(fb, gb.square().sum(0), bb.square().sum(0), rtol, "Fisher of the conv bias")


# --------------------------------------------------------------------------- DiagFisher on small models
@st.composite
def fisher_models(draw):
    """A small float64 model (MLP, CNN or sequence model; BatchNorm, LayerNorm, GroupNorm), its batch and
    labels. BatchNorm runs in eval mode, where a sample's gradient is the true per-sample gradient."""
    kind = draw(st.sampled_from(["mlp", "cnn", "seq"]))
    act = draw(st.sampled_from([nn.Tanh, nn.Sigmoid, nn.ReLU]))
    classes = draw(st.integers(2, 3))
    layers = []
    if kind == "mlp":
        width = draw(st.integers(1, 5))
        shape = (width,)
        for _ in range(draw(st.integers(1, 2))):
            hidden = draw(st.integers(1, 5))
            layers.append(nn.Linear(width, hidden, bias=draw(st.booleans())))
            norm = draw(st.sampled_from([None, "bn", "ln"]))
            layers += [nn.BatchNorm1d(hidden)] if norm == "bn" else [nn.LayerNorm(hidden)] if norm == "ln" else []
            layers.append(act())
            width = hidden
        layers.append(nn.Linear(width, classes))
    elif kind == "cnn":
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6))
        shape = (c, h, w)
        for _ in range(draw(st.integers(1, 2))):
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
            o = groups * draw(st.integers(1, 2))
            k = draw(st.integers(1, 3))
            padding = draw(st.sampled_from([0, 1, "same"]))
            mode = draw(st.sampled_from(["zeros", "reflect"])) if padding != 0 else "zeros"
            stride = 1 if padding == "same" else draw(st.integers(1, 2))
            layers.append(nn.Conv2d(c, o, k, stride, padding, groups=groups, bias=draw(st.booleans()),
                                    padding_mode=mode))
            with torch.no_grad():
                out = nn.Sequential(*layers).eval()(torch.zeros(1, *shape))
            norm = draw(st.sampled_from([None, "bn", "gn"]))
            if norm == "bn":
                layers.append(nn.BatchNorm2d(o))
            elif norm == "gn":
                per_group = [g for g in (1, 2) if o % g == 0 and o // g * out[0, 0].numel() > 1]
                layers += [nn.GroupNorm(draw(st.sampled_from(per_group)), o)] if per_group else []
            layers.append(act())
            c = o
            if min(out.shape[2:]) < 3:
                break
        layers += [nn.Flatten(), nn.Linear(out[0].numel(), classes)]
    else:
        length, d, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        shape = (length, d)
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), act(), nn.Flatten(), nn.Linear(length * hidden, classes)]
    model = nn.Sequential(*layers).double()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(generator=gen)
                mod.running_var.uniform_(0.5, 2, generator=gen)
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=F64) * 0.7)
    has_bn = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
    model.train(not has_bn and draw(st.booleans()))
    n = draw(st.integers(1, 5))
    x = torch.randn(n, *shape, generator=gen, dtype=F64)
    t = torch.randint(0, classes, (n,), generator=gen)
    if kind == "cnn" and draw(st.booleans()):
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model, x, t


@budget(0.4)
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels, not ours
@given(case=fisher_models(), reduction=st.sampled_from(["sum", "mean"]), backend=BACKENDS)
def test_diag_fisher_matches_vmap_per_sample_gradients(case, reduction, backend):
    model, x, t = case
    note(repr(model))
    fisher = DiagFisher(model)
    with use_backend(backend), fisher.accumulate(reduction=reduction):
        out = model(x)
        if reduction == "sum":
            fisher.backward(F.cross_entropy(out, t, reduction="none"))
        else:
            fisher.backward(F.cross_entropy(out, t))
    got = fisher.result()
    fisher.detach()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(prm, xi, ti):
        return F.cross_entropy(functional_call(model, prm, (xi[None],)), ti[None])
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, t)
    want = {k: g.square().mean(0) for k, g in per_sample.items()}
    assert set(got) == set(want)
    top = max(float(v.abs().max()) for v in want.values())
    for name in want:
        assert got[name].dtype == F64
        scale = max(float(want[name].abs().max()), 1e-6 * top)
        assert_within(got[name], want[name], torch.full_like(want[name], scale), 1e-9, f"Fisher of {name}")


# =========================================================================== bugs the properties found
# Minimal cases of bugs the properties found, kept as regression tests.
def test_found_linear_without_features():
    fw, fb = diag_fisher_linear(torch.zeros(2, 0), torch.zeros(2, 0))
    assert fw.shape == (0, 0) and fb.shape == (0,)


def test_found_reference_conv_without_channels():
    with use_backend("reference"):
        fw, fb = diag_fisher_conv2d(torch.ones(2, 2, 3, 3), torch.zeros(2, 0, 3, 3), 1)
    assert fw.shape == (2, 0, 1, 1) and fb.tolist() == [162.0, 162.0]


def test_found_global_nan_ties():
    ul = torch.tensor([[NAN, NAN, 0.0]])
    ul.view(torch.int32)[0, 1] = 0x7FC00001  # a NaN too, with another payload (torch's own casts make such NaNs)
    bd = torch.ones(1, 3)
    select_and_zero({"w": bd}, {"w": ul}, n=1.0, m=1 / 3, mode="global")
    assert bd.tolist() == [[0.0, 1.0, 1.0]]  # the first of the two largest changes (both NaN)


def test_found_reference_l1_layout_bits():
    b = torch.full((4, 5), -1.2853153944015503)
    b[0, 1] = 2.71468448638916
    a = torch.zeros(4, 5)
    a[0, 1] = 4.0
    with use_backend("reference"):
        dense, = neuron_l1_change([a], [b])
        column_major, = neuron_l1_change([a.t().contiguous().t()], [b])
    assert torch.equal(dense, column_major)


def test_found_float16_divergence():
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=F16)
    q = torch.tensor([[0.5, 0.0, 0.5]], dtype=F16)
    for kind in ("kl", "js"):
        assert torch.isfinite(f_divergence(p, q, kind)).all(), kind
    assert f_divergence(p, p, "kl").item() == 0


def test_found_nan_single_bin():
    z = torch.tensor([[NAN]])
    with use_backend("cpp"):
        cpp = soft_histogram(z, torch.zeros(1), 0.1, 1)
    with use_backend("reference"):
        reference = soft_histogram(z, torch.zeros(1), 0.1, 1)
    torch.testing.assert_close(cpp, reference, equal_nan=True)


def test_found_kl_gradient_underflow():
    """grad_q = -g·p/(q + ε): formed as (g·p)/ε, a denormal g underflowed to 0 before the division."""
    q = torch.zeros(1, 2, requires_grad=True)
    f_divergence(torch.full((1, 2), 0.5), q, "kl").backward(torch.tensor([1.4e-45]))
    torch.testing.assert_close(q.grad.double(), torch.full((1, 2), -1.4e-45 * 0.5 / 1e-10, dtype=F64), rtol=1e-2, atol=0)
