"""soft_histogram and f_divergence: BNA's differentiable per-channel histograms and the divergences between them.

Bins (BNA eqs. 5-6, §5.1). Channel c has M_c = num_bins[c] bins of width
Δb = `width` starting at b_0 = low[c]; interior edges b_i = low[c] + i·Δb for
i = 1..M_c-1; bin 0 is (-inf, b_1), bin M_c-1 is [b_{M_c-1}, +inf) (BNA's
I_1 and I_M; the paper counts intervals from 1). With s_i(z) = σ(τ(z - b_i)),
s_0 = 1 and s_{M_c} = 0,

    p[c, k] = mean over every non-channel element n of  s_k(z[n,c]) - s_{k+1}(z[n,c]),   k = 0..M_c-1

so M_c = 1 gives one bin of mass 1. The result is (C, max(num_bins)); entries
k >= M_c are exactly 0. It is float64 for float64 z and float32 otherwise
(a 16-bit histogram could not hold the probabilities). Gradients flow to z
and low (edges move with low); width, num_bins and tau are constants.

Window (why only a few edges per element are evaluated, exactly). Each s_i is
accumulated as a fixed-point integer Q_i = round(s_i·2^F), F = 32 (F = 62 for
float64 input); bin k adds Q_k - Q_{k+1}. For |τ(z - b_i)| >= T with T = 23
(44 for float64), σ(-|x|) < e^-T < 2^-(F+1) (e^-23 = 1.03e-10 < 2^-33 =
1.16e-10; e^-44 = 7.8e-20 < 2^-63 = 1.08e-19), so Q_i is exactly 2^F below z
and exactly 0 above it: evaluating only the edges within reach = T/(τΔb) +
1/64 bins of z (the 1/64 absorbs rounding of (z - low)/Δb) gives the same
integers as evaluating every edge. That is window = ⌊2·reach⌋ + 1 edges
(4 at BNA's τ = 150, Δb = 0.1), capped at max(num_bins), where the window
covers every bin (small τΔb). Integer sums are exact: mass is conserved
exactly (each element adds 2^F), the histogram is bit-identical run to run
and for any thread count, and the only rounding is 2^-(F+1) per edge value,
finer than fp32's own rounding of σ near 1. Limit: at most 2^31 - 1 elements
per channel.

Backward recomputes the window's sigmoids from z (it saves z and low, never
anything N×C×M): grad_z = τ/N' · Σ_i σ'(τ(z - b_i))·(g[c,i] - g[c,i-1]) over
the window's edges, grad_low[c] = -Σ grad_z over channel c, reduced in a fixed
order (no float atomics). It is the derivative of the unrounded function.

Edge cases: z = ±inf lands in the last/first bin with zero gradient. A NaN in
z makes its channel's row NaN (bins < M_c, a single bin too) and
its own gradient NaN. low must be finite; width > 0 and tau > 0 finite in the
dtype the op computes in (float32 unless z is float64: tau = 1e39 is inf
there), every edge low + i·Δb finite in it too, num_bins in [1, 2^24] with
C·max(num_bins) <= 2^26, and z needs at least one element per channel,
otherwise ValueError. num_bins is an int, a sequence of ints or an integer
tensor (anything else: TypeError). Values far outside [low, low + M·Δb] are
fine (they fall in the semi-infinite end bins). Under torch.compile pass
width, tau and num_bins as Python numbers (num_bins: an int or a list of
ints), not tensors. Neither op is twice differentiable: a backward through a
create_graph=True gradient raises instead of giving zeros.

f_divergence(p, q, kind, eps) reduces the last dim: "tv" = ½Σ|p - q|,
"kl" = Σ p·log((p + ε)/(q + ε)), "js" = ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2
with the same ε. Empty bins: 0·log(anything) = 0, and ε (default 1e-10) in
both numerator and denominator keeps every value and gradient finite when
q = 0 < p, and keeps KL(p‖p) = 0 exactly. Half-precision p and q are computed
in float32 and the results rounded once, so ε survives; a KL gradient
p/(q + ε) beyond float16's range (65504) is then ±inf, as the dtype holds it.
Entries past a channel's last bin are 0 in both histograms and contribute 0,
so no mask is needed.
"""
from __future__ import annotations

import math
import operator
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch

from .. import _library
from ..backends import Backend, refuse_double_backward, select, why_not_native, why_not_triton

_library.load()

__all__ = ["soft_histogram", "soft_histogram_reference", "bin_layout", "BinLayout", "f_divergence",
           "f_divergence_reference", "window", "BACKENDS", "DIVERGENCES"]

DIVERGENCES = ("tv", "kl", "js")
_CUTOFF = {torch.float32: 23.0, torch.float64: 44.0}
_MAX_PER_CHANNEL = 2**31 - 1
_MAX_BINS = 2**24
_MAX_ENTRIES = 2**26  # C·max(M): the histogram, and on CPU one int64 counter set per thread


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def window(tau: float, width: float, dtype: torch.dtype, max_bins: int) -> tuple[float, int]:
    """(reach, edges): the edges within `reach` bins of an element are evaluated, `edges` of them in all."""
    reach = _CUTOFF[_acc_dtype(dtype)] / (tau * width) + 1.0 / 64
    edges = max_bins if 2 * reach + 1 >= max_bins else math.floor(2 * reach) + 1
    return reach, max(1, edges)


# --------------------------------------------------------------------------- bin layout
class BinLayout(NamedTuple):
    """Per-channel bins: `soft_histogram(z, *layout, tau=...)`."""
    low: torch.Tensor  # (C,) b_0 per channel
    width: float
    num_bins: list[int]


def bin_layout(clean: Union[torch.Tensor, Iterable[torch.Tensor]], width: float = 0.1,
               channel_dim: int = 1) -> BinLayout:
    """BNA's bins from clean activations: b_0 = per-channel min, M = ⌈(max - min)/Δb⌉ (at least 1).

    `clean` is one tensor or an iterable of batches (min/max are combined). A channel needing more than 2^24
    bins, or C·max(M) above 2^26 (one outlier stretches every channel's row), is a ValueError naming the channel.
    """
    batches = [clean] if isinstance(clean, torch.Tensor) else list(clean)
    if not batches:
        raise ValueError("bin_layout: no clean activations given")
    _check_scalar("width", width, _acc_dtype(batches[0].dtype))
    lo = hi = None
    with torch.no_grad():
        for x in batches:
            if not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
                raise ValueError(f"bin_layout: expected non-empty floating-point activations, got {x.dtype} "
                                 f"{tuple(x.shape)}")
            cd = _normalise_dim(channel_dim, x.dim())
            flat = x.movedim(cd, 0).reshape(x.shape[cd], -1).double()
            b_lo, b_hi = flat.amin(1), flat.amax(1)
            lo = b_lo if lo is None else torch.minimum(lo, b_lo)
            hi = b_hi if hi is None else torch.maximum(hi, b_hi)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("bin_layout: clean activations contain NaN or inf")
        bins = torch.ceil((hi - lo) / width).clamp_min(1)
    # checked before anything of size C·max(M) exists: one outlier in one channel sets every channel's row length
    worst = int(torch.argmax(bins))
    most, channels = int(bins[worst]), bins.numel()
    spread = f"(its values span {float(lo[worst]):.6g} to {float(hi[worst]):.6g})"
    if most > _MAX_BINS:
        raise ValueError(f"bin_layout: channel {worst} needs {most} bins (> 2^24) {spread}; use a wider bin")
    if channels * most > _MAX_ENTRIES:
        raise ValueError(f"bin_layout: channel {worst} needs {most} bins {spread}, so the histogram of {channels} "
                         f"channels would have {channels} x {most} entries (> 2^26); use a wider bin or leave out "
                         f"the outliers")
    return BinLayout(lo.to(batches[0].dtype if batches[0].dtype == torch.float64 else torch.float32),
                     float(width), [int(b) for b in bins.tolist()])


# --------------------------------------------------------------------------- checks and layout
def _normalise_dim(channel_dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= channel_dim < max(ndim, 1):
        raise ValueError(f"soft_histogram: channel_dim {channel_dim} is out of range for a {ndim}-d input")
    return channel_dim % max(ndim, 1)


def _check_scalar(name: str, value: float, dtype: torch.dtype):
    """A finite number > 0 also once rounded to `dtype`, the dtype the kernels compute in (in float32, 1e39 is
    inf and 1e-46 is 0)."""
    finfo = torch.finfo(dtype)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and finfo.tiny * finfo.eps <= value <= finfo.max):
        raise ValueError(f"soft_histogram: {name} must be a finite number > 0 in {dtype}, got {value!r}")


def _bins_list(num_bins, C: Optional[int] = None) -> list[int]:
    """num_bins (an int, a sequence of ints or an integer tensor) as a list of ints, each in [1, 2^24]; with C,
    one per channel (a single count is repeated). Used by the public op, the reference and the checks."""
    tensor = isinstance(num_bins, torch.Tensor)
    if tensor:
        integral = not (num_bins.is_floating_point() or num_bins.is_complex() or num_bins.dtype == torch.bool)
        items = num_bins.reshape(-1).tolist() if integral else None
    elif isinstance(num_bins, Iterable) and not isinstance(num_bins, (str, bytes)):
        items = list(num_bins)
    else:
        items = [num_bins]
    try:
        if items is None or any(isinstance(b, bool) for b in items):
            raise TypeError
        bins = [operator.index(b) for b in items]
    except TypeError:
        shown = f"a {num_bins.dtype} tensor" if tensor else f"{type(num_bins).__name__} {num_bins!r}"
        raise TypeError(f"soft_histogram: num_bins must be an int, a sequence of ints or an integer tensor, got "
                        f"{shown}") from None
    bad = [b for b in bins if not 1 <= b <= _MAX_BINS]
    if bad:
        raise ValueError(f"soft_histogram: num_bins must be in [1, 2^24], got {bad[0]}")
    if C is None:
        return bins
    if len(bins) not in (1, C):
        raise ValueError(f"soft_histogram: num_bins has {len(bins)} entries; expected 1 or {C} (one per channel)")
    return bins * C if len(bins) == 1 else bins


def _check(z, low, width, num_bins, tau, channel_dim) -> tuple[int, list[int]]:
    """Validates the public op's arguments; returns (channel_dim, num_bins per channel)."""
    if not z.is_floating_point():
        raise TypeError(f"soft_histogram: z must be a floating-point tensor, got {z.dtype}")
    if z.dim() == 0:
        raise ValueError("soft_histogram: z must have at least one dimension")
    cd = _normalise_dim(channel_dim, z.dim())
    C = z.shape[cd]
    if tuple(low.shape) != (C,):
        raise ValueError(f"soft_histogram: low has shape {tuple(low.shape)}; expected ({C},), one b_0 per channel "
                         f"(dim {cd} of z {tuple(z.shape)})")
    if low.dtype != _acc_dtype(z.dtype):
        raise TypeError(f"soft_histogram: low must be {_acc_dtype(z.dtype)} for {z.dtype} z, got {low.dtype}")
    if low.device != z.device:
        raise ValueError(f"soft_histogram: z is on {z.device} but low is on {low.device}")
    _check_scalar("width", width, low.dtype)
    _check_scalar("tau", tau, low.dtype)
    if tau * width < 1e-30:
        raise ValueError(f"soft_histogram: tau * width = {tau * width} is too small to resolve any bin")
    if z.numel() == 0:
        raise ValueError("soft_histogram: z has no elements per channel (the histogram is a mean)")
    bins = _bins_list(num_bins, C)
    most = max(bins)
    if C * most > _MAX_ENTRIES:
        raise ValueError(f"soft_histogram: num_bins gives channel {bins.index(most)} {most} bins, so the histogram "
                         f"would have {C} x {most} entries (> 2^26); use fewer bins")
    if z.numel() // C > _MAX_PER_CHANNEL:
        raise ValueError(f"soft_histogram: {z.numel() // C} elements per channel; at most 2^31 - 1 are supported")
    return cd, bins


def _memory_perm(z: torch.Tensor) -> list[int]:
    """z's dims ordered by stride, so z.permute(perm) is contiguous without a copy when z is dense."""
    dims = sorted(range(z.dim()), key=lambda d: -z.stride(d))
    return dims if z.permute(dims).is_contiguous() else list(range(z.dim()))


def _inverse(perm) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _inner(shape, perm, cd) -> int:
    return math.prod(shape[d] for d in perm[perm.index(cd) + 1:])


# --------------------------------------------------------------------------- reference
def soft_histogram_reference(z: torch.Tensor, low: torch.Tensor, width: float, num_bins, tau: float = 150.0,
                             channel_dim: int = 1) -> torch.Tensor:
    """Dense definition (eqs. 5-6), differentiable by autograd: the test oracle and the benchmark's eager baseline.

    Materialises C × N' × max(num_bins) sigmoids, the way the papers' code does.
    """
    cd = _normalise_dim(channel_dim, z.dim())
    C = z.shape[cd]
    bins = _bins_list(num_bins, C)
    m = max(bins)
    zc = z.movedim(cd, 0).reshape(C, -1)
    i = torch.arange(1, m, device=z.device, dtype=zc.dtype)
    edges = low.to(zc.dtype)[:, None] + i[None, :] * width                      # (C, m-1)
    s = torch.sigmoid(tau * (zc[:, :, None] - edges[:, None, :]))               # (C, N', m-1)
    real = i[None, :] < torch.tensor(bins, device=z.device)[:, None]
    s = torch.where(real[:, None, :], s, torch.zeros_like(s))
    s = _pad_edges(s)
    hist = (s[..., :-1] - s[..., 1:]).mean(1)
    return _nan_channels(hist, zc.isnan().any(1), torch.tensor(bins, device=z.device))


def _nan_channels(hist, has_nan, num_bins):
    """A channel holding a NaN is NaN in its bins, a single bin too (where no edge, hence no sigmoid, sees it)."""
    k = torch.arange(hist.shape[1], device=hist.device)
    return torch.where(has_nan[:, None] & (k < num_bins[:, None]), torch.nan, hist)


def _pad_edges(s):
    """s_0 = 1 in front of the edges, s_M = 0 behind them."""
    end = s.shape[:-1] + (1,)
    return torch.cat([s.new_ones(end), s, s.new_zeros(end)], -1)


def _reference_forward(z, low, num_bins, inner, max_bins, width, tau, edges, reach):
    """The flat contract in dense PyTorch, chunked over rows (the fallback backend; evaluates every edge)."""
    C = low.numel()
    zv = z.view(-1, C, inner)
    i = torch.arange(1, max_bins, device=z.device, dtype=low.dtype)
    e = (low[:, None] + i * width)[:, None, :]                                  # (C, 1, m-1)
    real = (i < num_bins[:, None])[:, None, :]
    hist = torch.zeros(C, max_bins, dtype=low.dtype, device=z.device)
    for zc in _row_chunks(zv, max_bins):
        s = torch.sigmoid(tau * (zc.to(low.dtype).permute(1, 0, 2).reshape(C, -1, 1) - e))
        s = torch.where(real, s, torch.zeros_like(s))
        s = _pad_edges(s)
        hist += (s[..., :-1] - s[..., 1:]).sum(1)
    return _nan_channels(hist / (zv.shape[0] * inner), zv.isnan().any(0).any(-1), num_bins)


def _reference_backward(grad, z, low, num_bins, inner, width, tau, edges, reach):
    C, max_bins = grad.shape
    zv = z.view(-1, C, inner)
    i = torch.arange(1, max_bins, device=z.device, dtype=low.dtype)
    e = (low[:, None] + i * width)[:, None, None, :]                            # (C, 1, 1, m-1)
    gdiff = torch.where(i < num_bins[:, None], grad[:, 1:] - grad[:, :-1], torch.zeros_like(grad[:, 1:]))
    scale = tau / (zv.shape[0] * inner)
    parts = []
    for zc in _row_chunks(zv, max_bins):
        s = torch.sigmoid(tau * (zc.to(low.dtype).permute(1, 0, 2)[..., None] - e))
        parts.append((scale * (s * (1 - s) * gdiff[:, None, None, :]).sum(-1)).permute(1, 0, 2))
    grad_z = torch.cat(parts, 0)
    return grad_z.to(z.dtype).view(z.shape), -grad_z.sum((0, 2))


def _row_chunks(zv, max_bins, budget=2**22):
    rows = max(1, budget // max(1, zv.shape[1] * zv.shape[2] * max_bins))
    return zv.split(rows, 0)


# --------------------------------------------------------------------------- backends
def _native_forward(z, low, num_bins, inner, max_bins, width, tau, edges, reach):
    return torch.ops.pydefend_native.soft_histogram_fwd(z, low, num_bins, inner, max_bins, width, tau, edges, reach)


def _native_backward(grad, z, low, num_bins, inner, width, tau, edges, reach):
    return torch.ops.pydefend_native.soft_histogram_bwd(grad, z, low, num_bins, inner, width, tau, edges, reach)


def _triton_forward(*args):
    from ..kernels import soft_histogram as k
    return k.soft_histogram_forward(*args)


def _triton_backward(*args):
    from ..kernels import soft_histogram as k
    return k.soft_histogram_backward(*args)


def _why_not_native(device):
    reason = why_not_native(device)
    if reason is None and device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "pydefend_native::soft_histogram_fwd", "CUDA"):
        return "the compiled library has no CUDA soft_histogram kernel"
    return reason


BACKENDS = {
    "cpp": Backend("cpp", _native_forward, _native_backward, ("cpu",), _why_not_native),
    "cuda": Backend("cuda", _native_forward, _native_backward, ("cuda",), _why_not_native),
    "triton": Backend("triton", _triton_forward, _triton_backward, ("cuda", "cpu"), why_not_triton),
    "reference": Backend("reference", _reference_forward, _reference_backward, ("cpu", "cuda", "mps", "xpu")),
}


# --------------------------------------------------------------------------- op registration
_fwd_op = "pydefend::soft_histogram_fwd"
_bwd_op = "pydefend::soft_histogram_bwd"


@torch.library.register_fake(_fwd_op)
def _fwd_fake(z, low, width, num_bins, tau, channel_dim):
    cd, bins = _check(z, low, width, num_bins, tau, channel_dim)
    return z.new_empty((z.shape[cd], max(bins)), dtype=low.dtype)


def _flat_args(z, low, width, num_bins, tau, channel_dim):
    cd, bins = _check(z, low, width, num_bins, tau, channel_dim)
    perm = _memory_perm(z)
    zp = z.permute(perm).contiguous()
    nb = torch.tensor(bins, dtype=torch.int64, device=z.device)
    reach, edges = window(tau, width, z.dtype, max(bins))
    return zp, perm, nb, _inner(z.shape, perm, cd), max(bins), reach, edges


def _check_edges(low, width, max_bins):
    """low finite, and so every edge low + i·width, i <= max_bins, in low's dtype (one reduction)."""
    ends = torch.stack([low, low + width * max_bins])
    if torch.isfinite(ends).all():
        return
    if not torch.isfinite(low).all():
        raise ValueError("soft_histogram: low contains NaN or inf")
    c = int(torch.nonzero(~torch.isfinite(ends[1]))[0])
    raise ValueError(f"soft_histogram: channel {c}'s edges low + i * width reach past the {low.dtype} range "
                     f"(low = {float(low[c]):.6g}, {max_bins} bins of width {width}); use a smaller width")


def _fwd_device(z, low, width, num_bins, tau, channel_dim):
    zp, perm, nb, inner, max_bins, reach, edges = _flat_args(z, low, width, num_bins, tau, channel_dim)
    _check_edges(low, width, max_bins)
    backend = select("soft_histogram", BACKENDS, z.device)
    return backend.forward(zp, low.contiguous(), nb, inner, max_bins, float(width), float(tau), edges, reach)


@torch.library.register_fake(_bwd_op)
def _bwd_fake(grad_hist, z, low, width, num_bins, tau, channel_dim):
    _check(z, low, width, num_bins, tau, channel_dim)
    perm = _memory_perm(z)
    grad_z = z.new_empty([z.shape[d] for d in perm]).permute(_inverse(perm))
    return grad_z, torch.empty_like(low)


def _bwd_device(grad_hist, z, low, width, num_bins, tau, channel_dim):
    zp, perm, nb, inner, max_bins, reach, edges = _flat_args(z, low, width, num_bins, tau, channel_dim)
    if tuple(grad_hist.shape) != (low.numel(), max_bins):
        raise ValueError(f"soft_histogram: gradient has shape {tuple(grad_hist.shape)}, "
                         f"expected {(low.numel(), max_bins)}")
    _check_edges(low, width, max_bins)
    backend = select("soft_histogram", BACKENDS, z.device)
    grad_z, grad_low = backend.backward(grad_hist.to(low.dtype).contiguous(), zp, low.contiguous(), nb, inner,
                                        float(width), float(tau), edges, reach)
    return grad_z.view(zp.shape).permute(_inverse(perm)), grad_low


for _device in ("cpu", "cuda"):
    torch.library.register_kernel(_fwd_op, _device, _fwd_device)
    torch.library.register_kernel(_bwd_op, _device, _bwd_device)


def _setup_context(ctx, inputs, output):
    z, low, width, num_bins, tau, channel_dim = inputs
    ctx.save_for_backward(z, low)
    ctx.args = (width, num_bins, tau, channel_dim)


def _backward(ctx, grad_hist):
    z, low = ctx.saved_tensors
    grad_z, grad_low = torch.ops.pydefend.soft_histogram_bwd(grad_hist, z, low, *ctx.args)
    return grad_z, grad_low, None, None, None, None


torch.library.register_autograd(_fwd_op, _backward, setup_context=_setup_context)
refuse_double_backward(_bwd_op, "pydefend.soft_histogram")


# --------------------------------------------------------------------------- f-divergences
def _check_divergence(p, q, kind, eps):
    if kind not in DIVERGENCES:
        raise ValueError(f"f_divergence: unknown kind {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if not (p.is_floating_point() and q.is_floating_point()) or p.dtype != q.dtype:
        raise TypeError(f"f_divergence: p and q must share one floating-point dtype, got {p.dtype} and {q.dtype}")
    if p.shape != q.shape or p.dim() == 0:
        raise ValueError(f"f_divergence: p and q must have one shape (..., bins), got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    if p.device != q.device:
        raise ValueError(f"f_divergence: p is on {p.device} but q is on {q.device}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"f_divergence: eps must be a finite number > 0, got {eps!r}")


def _xlog(a, eps):
    return a * torch.log(a + eps)


def f_divergence_reference(p: torch.Tensor, q: torch.Tensor, kind: str = "tv", eps: float = 1e-10) -> torch.Tensor:
    """The divergences in plain PyTorch (differentiable by autograd); reduces the last dim."""
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "kl":
        return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)
    m = 0.5 * (p + q)
    return (0.5 * (_xlog(p, eps) + _xlog(q, eps)) - _xlog(m, eps)).sum(-1)


@torch.library.register_fake("pydefend::f_divergence")
def _div_fake(p, q, kind, eps):
    _check_divergence(p, q, kind, eps)
    return p.new_empty(p.shape[:-1])


def _div_device(p, q, kind, eps):
    _check_divergence(p, q, kind, eps)
    # Half types compute in float32: there eps = 1e-10 would round away and an empty bin give 0·log 0 = NaN.
    acc = _acc_dtype(p.dtype)
    return f_divergence_reference(p.to(acc), q.to(acc), kind, eps).to(p.dtype)


@torch.library.register_fake("pydefend::f_divergence_bwd")
def _div_bwd_fake(grad, p, q, kind, eps):
    return torch.empty_like(p), torch.empty_like(q)


def _dlog(a, eps):  # d/da of a·log(a + ε)
    return torch.log(a + eps) + a / (a + eps)


def _div_bwd_device(grad, p, q, kind, eps):
    acc = _acc_dtype(p.dtype)
    gp, gq = _div_bwd_acc(grad.to(acc), p.to(acc), q.to(acc), kind, eps)
    return gp.to(p.dtype), gq.to(q.dtype)


def _div_bwd_acc(grad, p, q, kind, eps):
    g = grad.unsqueeze(-1)
    if kind == "tv":
        gp = 0.5 * torch.sign(p - q) * g
        return gp, -gp
    if kind == "kl":
        return g * (_dlog(p, eps) - torch.log(q + eps)), -g * (p / (q + eps))  # ratio first: g·p may underflow
    dm = _dlog(0.5 * (p + q), eps)
    return 0.5 * g * (_dlog(p, eps) - dm), 0.5 * g * (_dlog(q, eps) - dm)


for _device in ("cpu", "cuda"):
    torch.library.register_kernel("pydefend::f_divergence", _device, _div_device)
    torch.library.register_kernel("pydefend::f_divergence_bwd", _device, _div_bwd_device)


def _div_setup_context(ctx, inputs, output):
    p, q, kind, eps = inputs
    ctx.save_for_backward(p, q)
    ctx.kind, ctx.eps = kind, eps


def _div_backward(ctx, grad):
    p, q = ctx.saved_tensors
    gp, gq = torch.ops.pydefend.f_divergence_bwd(grad, p, q, ctx.kind, ctx.eps)
    return gp, gq, None, None


torch.library.register_autograd("pydefend::f_divergence", _div_backward, setup_context=_div_setup_context)
refuse_double_backward("pydefend::f_divergence_bwd", "pydefend.f_divergence")


# --------------------------------------------------------------------------- public API
def soft_histogram(z: torch.Tensor, low: torch.Tensor, width: float, num_bins: Union[int, Sequence[int]],
                   tau: float = 150.0, channel_dim: int = 1) -> torch.Tensor:
    """(C, max(num_bins)) soft-histogram probabilities of z per channel (see the module docstring).

    low: (C,) b_0 per channel (cast to float32, or float64 for float64 z); width: Δb;
    num_bins: one int or one per channel (list or tensor); tau: the sigmoid's scale.
    """
    if z.is_floating_point() and low.dtype != _acc_dtype(z.dtype):
        low = low.to(_acc_dtype(z.dtype))
    return torch.ops.pydefend.soft_histogram_fwd(z, low, float(width), _bins_list(num_bins), float(tau), channel_dim)


def f_divergence(p: torch.Tensor, q: torch.Tensor, kind: str = "tv", eps: float = 1e-10) -> torch.Tensor:
    """Per-row f-divergence D(p‖q) over the last dim: "tv", "kl" or "js" (empty bins: see the module docstring)."""
    return torch.ops.pydefend.f_divergence(p, q, kind, float(eps))
