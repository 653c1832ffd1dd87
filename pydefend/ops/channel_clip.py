"""channel_clip: a per-channel (or per-element) upper bound with gradient to the bound.

    y = min(r, upper),   r = x, or r = max(x, 0) with relu=True

`upper` broadcasts over the batch: shape (C,) with C = x.shape[channel_dim]
(per channel), or x.shape[1:] for x with 3+ dims (per element, as UNIT's
official code bounds conv maps). A 1-D upper is always per channel (for a
2-D x, per channel along dim 1 is per element); any other shape is an error.
Gradients:

    dx     = dy * [not clipped]        (and x > 0 when relu=True)
    dupper = sum of dy * [clipped]     reduced to upper's shape

Tie rule: an element is clipped when r >= upper, so at x == upper the whole
gradient goes to the bound (torch.minimum would split it in half). With
relu=True and upper <= 0 every element is clipped (min(max(x, 0), u) = u).
NaN in x propagates to y and passes its gradient to x; NaN in upper is
rejected (one small reduction over `upper` per call). +inf bounds never clip.

Not twice differentiable: a backward through a create_graph=True gradient
raises (it would otherwise give zeros with only a warning).

Memory: backward keeps a packed state mask, 1 bit per element (2 with the
ReLU fused), instead of x or y: 1/32 (1/16) of an fp32 input. The upper
gradient is reduced deterministically: bit-identical run to run.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _library
from ..backends import Backend, refuse_double_backward, select, why_not_native, why_not_triton

_library.load()

__all__ = ["channel_clip", "ChannelClip", "channel_clip_reference", "BACKENDS", "mask_bytes"]

BELOW, PASSED, CLIPPED = 0, 1, 2


def mask_bytes(numel: int, relu: bool) -> int:
    return (numel + 3) // 4 if relu else (numel + 7) // 8


# --------------------------------------------------------------------------- layout
# Kernels see x as a flat contiguous array where element i uses
# upper_flat[(i // inner) % period]. Dense inputs in any memory order
# (channels-last included) are taken as they lie: `perm` orders x's dims by
# stride, so x.permute(perm) is contiguous without a copy.

def _upper_kind(shape, upper_shape, channel_dim: int) -> str:
    """"channel" for a 1-D upper, "element" for an upper of shape x.shape[1:] with 2+ dims, else an error.

    A 1-D upper is never taken per element: otherwise (F,) bounds of a (B, F) input with channel_dim=0 would
    clip columns when B != F and rows when B == F.
    """
    upper_shape, shape = tuple(upper_shape), tuple(shape)
    channels = shape[channel_dim] if shape else None
    if len(upper_shape) == 1:
        if upper_shape == (channels,):
            return "channel"
        other = next((d for d, size in enumerate(shape) if size == upper_shape[0] and d != channel_dim), None)
        hint = f", or pass channel_dim={other} (the dim of size {upper_shape[0]})" if other is not None else ""
        raise ValueError(f"channel_clip: upper has shape {upper_shape}; a 1-D upper holds one bound per channel "
                         f"and must be ({channels},) for channel_dim={channel_dim} of x {shape}{hint}")
    if len(upper_shape) >= 2 and upper_shape == shape[1:]:
        return "element"
    per_element = f" or {shape[1:]} for one bound per element" if len(shape) >= 3 else ""
    raise ValueError(f"channel_clip: upper has shape {upper_shape}; expected ({channels},) for one bound per "
                     f"channel (dim {channel_dim} of x {shape}){per_element}")


def _memory_perm(x: torch.Tensor, kind: str) -> list[int]:
    dims = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # stable: ties keep logical order
    if x.permute(dims).is_contiguous() and (kind == "channel" or dims[0] == 0):
        return dims
    return list(range(x.dim()))  # not dense (or batch not outermost): kernels get a contiguous copy


def _inverse(perm) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _flat_upper(upper: torch.Tensor, kind: str, perm, shape, channel_dim: int):
    """(upper in kernel order, inner) for x.permute(perm)."""
    if kind == "channel":
        pos = list(perm).index(channel_dim)
        return upper.contiguous(), math.prod(shape[d] for d in perm[pos + 1:])
    return upper.permute([d - 1 for d in perm[1:]]).contiguous(), 1


def _normalise_dim(channel_dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= channel_dim < max(ndim, 1):
        raise ValueError(f"channel_clip: channel_dim {channel_dim} is out of range for a {ndim}-d input")
    return channel_dim % max(ndim, 1)


def _check_inputs(x: torch.Tensor, upper: torch.Tensor):
    if not x.is_floating_point():
        raise TypeError(f"channel_clip: x must be a floating-point tensor, got {x.dtype}")
    if upper.dtype != x.dtype:
        raise TypeError(f"channel_clip: upper has dtype {upper.dtype} but x has {x.dtype}")
    if upper.device != x.device:
        raise ValueError(f"channel_clip: x is on {x.device} but upper is on {upper.device}")
    if x.dim() == 0:
        raise ValueError("channel_clip: x must have at least one dimension")


# --------------------------------------------------------------------------- reference
def channel_clip_reference(x: torch.Tensor, upper: torch.Tensor, channel_dim: int = 1, relu: bool = False):
    """Dense PyTorch definition of the op, differentiable by autograd. The test oracle."""
    channel_dim = _normalise_dim(channel_dim, x.dim())
    if _upper_kind(x.shape, upper.shape, channel_dim) == "channel":
        view = [1] * x.dim()
        view[channel_dim] = -1
        u = upper.view(view)
    else:
        u = upper.unsqueeze(0)
    r = torch.where(x <= 0, torch.zeros_like(x), x) if relu else x
    return torch.where(r >= u, u.expand_as(x), r)


def _reference_forward(x, upper, inner: int, relu: bool):
    """The flat contract in plain PyTorch (the fallback backend)."""
    period = upper.numel()
    xv = x.reshape(-1, period, inner)
    u = upper.reshape(1, period, inner if inner == 1 else 1)
    r = torch.where(xv <= 0, torch.zeros_like(xv), xv) if relu else xv
    clipped = r >= u
    y = torch.where(clipped, u.expand_as(xv), r).reshape(x.shape)
    if relu:
        state = torch.where(clipped, CLIPPED, torch.where(xv <= 0, BELOW, PASSED))
    else:
        state = clipped.long()
    return y, _pack(state.reshape(-1).to(torch.uint8), 2 if relu else 1)


def _reference_backward(grad, mask, upper, inner: int, relu: bool):
    period = upper.numel()
    state = _unpack(mask, grad.numel(), 2 if relu else 1).view(-1, period, inner)
    if not relu:
        state = torch.where(state == 1, CLIPPED, PASSED)
    g = grad.reshape(-1, period, inner)
    grad_x = torch.where(state == PASSED, g, torch.zeros_like(g)).reshape(grad.shape)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_upper = torch.where(state == CLIPPED, g, torch.zeros_like(g)).sum((0, 2), dtype=acc)
    return grad_x, grad_upper.to(upper.dtype).reshape(upper.shape)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    pad = (-values.numel()) % per_byte
    v = torch.nn.functional.pad(values, (0, pad)).view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=values.device, dtype=torch.int32)
    return (v << shifts).sum(1).to(torch.uint8)


def _unpack(mask: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, device=mask.device, dtype=torch.int32)
    v = (mask.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1)[:numel]


# --------------------------------------------------------------------------- backends
def _triton_forward(x, upper, inner, relu):
    from ..kernels import channel_clip as k
    return k.channel_clip_forward(x, upper, inner, relu)


def _triton_backward(grad, mask, upper, inner, relu):
    from ..kernels import channel_clip as k
    return k.channel_clip_backward(grad, mask, upper, inner, relu)


def _native_forward(x, upper, inner, relu):
    return torch.ops.pydefend_native.channel_clip_fwd(x, upper, inner, relu)


def _native_backward(grad, mask, upper, inner, relu):
    return torch.ops.pydefend_native.channel_clip_bwd(grad, mask, upper, inner, relu)


BACKENDS = {
    "cpp": Backend("cpp", _native_forward, _native_backward, ("cpu",), why_not_native),
    "cuda": Backend("cuda", _native_forward, _native_backward, ("cuda",), why_not_native),
    "triton": Backend("triton", _triton_forward, _triton_backward, ("cuda", "cpu"), why_not_triton),
    "reference": Backend("reference", _reference_forward, _reference_backward, ("cpu", "cuda", "mps", "xpu", "meta")),
}


# --------------------------------------------------------------------------- op registration
_fwd_op = "pydefend::channel_clip_fwd"
_bwd_op = "pydefend::channel_clip_bwd"


def _empty_outputs(x, kind, perm, relu):
    shape = [x.shape[d] for d in perm]
    out = torch.empty(shape, dtype=x.dtype, device=x.device).permute(_inverse(perm))
    mask = torch.empty((mask_bytes(x.numel(), relu),), dtype=torch.uint8, device=x.device)
    return out, mask


@torch.library.register_fake(_fwd_op)
def _fwd_fake(x, upper, channel_dim, relu):
    _check_inputs(x, upper)
    kind = _upper_kind(x.shape, upper.shape, _normalise_dim(channel_dim, x.dim()))
    return _empty_outputs(x, kind, _memory_perm(x, kind), relu)


def _fwd_device(x, upper, channel_dim, relu):
    _check_inputs(x, upper)
    channel_dim = _normalise_dim(channel_dim, x.dim())
    kind = _upper_kind(x.shape, upper.shape, channel_dim)
    if torch.isnan(upper).any():
        raise ValueError("channel_clip: upper contains NaN")
    perm = _memory_perm(x, kind)
    if x.numel() == 0:
        return _empty_outputs(x, kind, perm, relu)
    xp = x.permute(perm).contiguous()
    flat_upper, inner = _flat_upper(upper, kind, perm, x.shape, channel_dim)
    backend = select("channel_clip", BACKENDS, x.device)
    out, mask = backend.forward(xp, flat_upper, inner, relu)
    return out.view(xp.shape).permute(_inverse(perm)), mask


@torch.library.register_fake(_bwd_op)
def _bwd_fake(grad_out, mask, upper, channel_dim, relu, perm):
    shape = [grad_out.shape[d] for d in perm]
    grad_x = torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device).permute(_inverse(perm))
    return grad_x, torch.empty_like(upper)


def _bwd_device(grad_out, mask, upper, channel_dim, relu, perm):
    channel_dim = _normalise_dim(channel_dim, grad_out.dim())
    kind = _upper_kind(grad_out.shape, upper.shape, channel_dim)
    gp = grad_out.permute(perm).contiguous()
    if grad_out.numel() == 0:
        return torch.zeros_like(gp).permute(_inverse(perm)), torch.zeros_like(upper)
    flat_upper, inner = _flat_upper(upper, kind, perm, grad_out.shape, channel_dim)
    backend = select("channel_clip", BACKENDS, grad_out.device)
    grad_x, grad_flat = backend.backward(gp, mask, flat_upper, inner, relu)
    grad_x = grad_x.view(gp.shape).permute(_inverse(perm))
    if kind == "element":
        grad_upper = grad_flat.view(flat_upper.shape).permute(_inverse([d - 1 for d in perm[1:]]))
    else:
        grad_upper = grad_flat.view(upper.shape)
    return grad_x, grad_upper.contiguous()


for _device in ("cpu", "cuda"):
    torch.library.register_kernel(_fwd_op, _device, _fwd_device)
    torch.library.register_kernel(_bwd_op, _device, _bwd_device)


def _setup_context(ctx, inputs, output):
    x, upper, channel_dim, relu = inputs
    _, mask = output
    ctx.save_for_backward(mask, upper)
    ctx.channel_dim, ctx.relu = channel_dim, relu
    kind = _upper_kind(x.shape, upper.shape, _normalise_dim(channel_dim, x.dim()))
    ctx.perm = _memory_perm(x, kind)


def _backward(ctx, grad_out, _grad_mask):
    mask, upper = ctx.saved_tensors
    grad_x, grad_upper = torch.ops.pydefend.channel_clip_bwd(
        grad_out, mask, upper, ctx.channel_dim, ctx.relu, ctx.perm)
    return grad_x, grad_upper, None, None


torch.library.register_autograd(_fwd_op, _backward, setup_context=_setup_context)
refuse_double_backward(_bwd_op, "pydefend.channel_clip")


# --------------------------------------------------------------------------- public API
def channel_clip(x: torch.Tensor, upper: torch.Tensor, channel_dim: int = 1, relu: bool = False) -> torch.Tensor:
    """min(x, upper) (or min(max(x, 0), upper)) with upper per channel or per element.

    `upper` is cast to x's dtype. See the module docstring for gradients,
    the tie rule and NaN/inf handling.
    """
    if upper.dtype != x.dtype and x.is_floating_point():
        upper = upper.to(x.dtype)
    return torch.ops.pydefend.channel_clip_fwd(x, upper, channel_dim, relu)[0]


class ChannelClip(nn.Module):
    """A learnable upper bound: `ChannelClip(64)` per channel, `ChannelClip((64, 8, 8))` per element.

    Starts at `init` (+inf: no clipping). With relu=True it replaces a ReLU
    followed by the clip in one op.
    """

    def __init__(self, shape, channel_dim: int = 1, relu: bool = False, init: float = float("inf"),
                 device=None, dtype=None):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.upper = nn.Parameter(torch.full(shape, init, device=device, dtype=dtype))
        self.channel_dim, self.relu = channel_dim, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_clip(x, self.upper, self.channel_dim, self.relu)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.upper.shape)}, channel_dim={self.channel_dim}, relu={self.relu}"
