"""diag_fisher: diagonal empirical Fisher  F_j = (1/N) sum_n (d loss_n / d theta_j)^2  without per-sample gradients.

Three ops add  sum_n g_n^2  (g_n: sample n's gradient) from what backward
already has, the layer input x and the output gradient dy:

    diag_fisher_norm(dy, x, mean, invstd)   norm affine (BatchNorm, LayerNorm, GroupNorm):
        g_gamma[n,p] = sum_{a,b} dy * (x - mean) * invstd,  g_beta[n,p] = sum_{a,b} dy
        on (N, A, P, B) views (see csrc/diag_fisher_cpu.cpp); squared and summed over n in the
        same pass, extra memory O(P). Backends: cpp, cuda, triton, reference.
    diag_fisher_linear(dy, x)               nn.Linear: 2-D inputs via  (dy∘dy)^T (x∘x)  (one GEMM, the
        reference backend);  inputs (N, ..., I) via per-sample  G_n = dy_n^T x_n,  squared and summed.
        Backends: cpp and triton (fused: G_n lives in a register tile), reference (torch GEMMs over sample chunks).
    diag_fisher_conv2d(dy, x, ...)          nn.Conv2d: per-sample G_n = dy_n · patches(x_n)^T. Backends: cpp
        (fused, implicit im2col, any strides: NCHW and channels-last without copies), reference (torch unfold
        + bmm over chunks of samples; only one chunk's patches exist at a time).

Outputs are float32 (float64 for float64 inputs). The fused kernels need O(P) extra memory plus a few
hundred KiB per thread. Reference chunks: at most WORKSPACE_BYTES of workspace, at least one sample (or one
row of a 2-D input), so extra memory is O(P) + workspace, independent of N.

`DiagFisher(model, params=...)` hooks the layers and accumulates the Fisher of the selected
parameters during `with fisher.accumulate(): ...forward and backward...`:

* A sample's gradient is its term in the batch gradient: with a sum loss, g_n = dy_n-part of the
  batch gradient. In eval mode (and for layers after which samples never mix) this is the true
  per-sample gradient of loss_n. With BatchNorm in train mode samples are coupled through the batch
  statistics; g_n is then the gradient w.r.t. a copy of the parameter used only by sample n (the
  per-n terms of the sums above), and sum_n g_n is still exactly the batch gradient.
* The loss must be a sum of per-sample losses (reduction="sum"), or their mean over the batch
  (reduction="mean": per-sample gradients are scaled by N). `fisher.backward(loss)` checks this:
  it takes per-sample losses (N,), or a scalar whose last op is a sum/mean over (N,) or a
  cross-entropy/NLL with reduction sum/mean, and rejects anything else.
* The batch dimension is dim 0 of every hooked layer's input; `result()` divides by the number of
  samples seen in forward passes inside accumulate().
* Rejected with a clear error: parameters not in the model, selected parameters of unsupported
  layers (supported: Linear, Conv2d, BatchNorm1d/2d/3d, LayerNorm, GroupNorm; subclasses only if
  they keep the base forward, or for LayerNorm and GroupNorm if their output equals the base forward's
  on the first batch, as timm's does), parameters shared by several layers, a layer called twice in one
  pass (its per-sample gradient is a sum over calls), a Conv2d with stride, dilation or kernel size < 1 or
  negative padding, and a second gradient through one forward pass (a second backward, or a
  torch.autograd.grad besides the backward: the Fisher would be added twice).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _library
from ..backends import Backend, forced_backend, select, why_not_native, why_not_triton

_library.load()

__all__ = ["DiagFisher", "diag_fisher_norm", "diag_fisher_linear", "diag_fisher_conv2d", "NORM_BACKENDS",
           "LINEAR_BACKENDS", "CONV_BACKENDS", "WORKSPACE_BYTES"]

WORKSPACE_BYTES = 64 * 2**20  # per-chunk workspace bound of the reference linear (sequence) and conv paths


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- norm affine
def _check_norm(grad, x, mean, invstd):
    if not x.is_floating_point() or grad.dtype != x.dtype:
        raise TypeError(f"diag_fisher_norm: grad_out and input must share a floating dtype, got {grad.dtype} "
                        f"and {x.dtype}")
    if x.dim() != 4 or grad.shape != x.shape:
        raise ValueError(f"diag_fisher_norm: grad_out and input must both be (N, A, P, B), got "
                         f"{tuple(grad.shape)} and {tuple(x.shape)}")
    acc = _acc_dtype(x.dtype)
    if mean.dtype != acc or invstd.dtype != acc:
        raise TypeError(f"diag_fisher_norm: mean and invstd must be {acc} for {x.dtype} inputs")
    n, a, p, _ = x.shape
    if mean.dim() != 3 or mean.shape != invstd.shape or mean.shape[0] not in (1, n) or \
            mean.shape[1] not in (1, a) or mean.shape[2] < 1 or p % mean.shape[2]:
        raise ValueError(f"diag_fisher_norm: stats of shape {tuple(mean.shape)} / {tuple(invstd.shape)} do not "
                         f"fit input (N, A, P, B) = {tuple(x.shape)}; expected (1 or N, 1 or A, a divisor of P)")
    devices = {grad.device, x.device, mean.device, invstd.device}
    if len(devices) > 1:
        raise ValueError(f"diag_fisher_norm: tensors are on different devices: {sorted(map(str, devices))}")


def _reference_norm(grad, x, mean, invstd):
    """The norm contract in plain PyTorch (materialises the (N, P) per-sample gradients)."""
    acc = _acc_dtype(x.dtype)
    group = x.shape[2] // mean.shape[2]
    m = mean.repeat_interleave(group, dim=2).unsqueeze(-1)
    r = invstd.repeat_interleave(group, dim=2).unsqueeze(-1)
    g = grad.to(acc)
    gw = (g * (x.to(acc) - m) * r).sum((1, 3))
    gb = g.sum((1, 3))
    return gw.square().sum(0), gb.square().sum(0)


def _native_norm(grad, x, mean, invstd):
    return torch.ops.pydefend_native.diag_fisher_norm(grad, x, mean, invstd)


def _triton_norm(grad, x, mean, invstd):
    from ..kernels import diag_fisher as k
    return k.norm_fisher(grad, x, mean, invstd)


NORM_BACKENDS = {
    "cpp": Backend("cpp", _native_norm, None, ("cpu",), why_not_native),
    "cuda": Backend("cuda", _native_norm, None, ("cuda",), why_not_native),
    "triton": Backend("triton", _triton_norm, None, ("cuda", "cpu"), why_not_triton),
    "reference": Backend("reference", _reference_norm, None, ("cpu", "cuda", "mps", "xpu", "meta")),
}

_norm_op = "pydefend::diag_fisher_norm"


@torch.library.register_fake(_norm_op)
def _norm_fake(grad, x, mean, invstd):
    _check_norm(grad, x, mean, invstd)
    out = x.new_empty((x.shape[2],), dtype=_acc_dtype(x.dtype))
    return out, torch.empty_like(out)


def _norm_device(grad, x, mean, invstd):
    _check_norm(grad, x, mean, invstd)
    if x.numel() == 0:
        out = torch.zeros((x.shape[2],), dtype=_acc_dtype(x.dtype), device=x.device)
        return out, out.clone()
    backend = select("diag_fisher_norm", NORM_BACKENDS, x.device)
    fw, fb = backend.forward(grad.contiguous(), x.contiguous(), mean.contiguous(), invstd.contiguous())
    return fw, fb


# --------------------------------------------------------------------------- linear
def _check_linear(grad, x):
    if not x.is_floating_point() or grad.dtype != x.dtype:
        raise TypeError(f"diag_fisher_linear: grad_out and input must share a floating dtype, got {grad.dtype} "
                        f"and {x.dtype}")
    if x.dim() < 2 or grad.dim() != x.dim() or grad.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"diag_fisher_linear: expected input (N, ..., I) and grad_out (N, ..., O) with the same "
                         f"leading dims, got {tuple(x.shape)} and {tuple(grad.shape)}")
    if grad.device != x.device:
        raise ValueError(f"diag_fisher_linear: grad_out is on {grad.device} but input is on {x.device}")


def _reference_linear(grad, x):
    """grad (N, L, O), x (N, L, I) -> Fisher of weight (O, I) and bias (O,), over bounded chunks."""
    n, l, o = grad.shape
    i = x.shape[2]
    acc = _acc_dtype(x.dtype)
    fw = torch.zeros((o, i), dtype=acc, device=x.device)
    fb = torch.zeros((o,), dtype=acc, device=x.device)
    item = torch.finfo(acc).bits // 8
    if l == 1:  # (dy∘dy)^T (x∘x): one GEMM per chunk of rows
        rows = max(1, WORKSPACE_BYTES // (item * max(1, o + i)))  # max: layers without features
        for r0 in range(0, n, rows):
            g = grad[r0:r0 + rows, 0].to(acc).square()
            fw.addmm_(g.t(), x[r0:r0 + rows, 0].to(acc).square())
            fb += g.sum(0)
        return fw, fb
    chunk = max(1, WORKSPACE_BYTES // (item * max(1, o * i + l * (o + i))))
    for n0 in range(0, n, chunk):
        g = grad[n0:n0 + chunk].to(acc)
        per_sample = torch.bmm(g.transpose(1, 2), x[n0:n0 + chunk].to(acc))  # (chunk, O, I)
        fw += per_sample.square_().sum(0)
        fb += g.sum(1).square().sum(0)
    return fw, fb


def _triton_linear(grad, x):
    from ..kernels import diag_fisher as k
    return k.linear_fisher(grad.contiguous(), x.contiguous())


def _native_linear(grad, x):
    return torch.ops.pydefend_native.diag_fisher_linear(grad, x)


def _reference_linear_dense(grad, x):
    return _reference_linear(grad.contiguous(), x.contiguous())


LINEAR_BACKENDS = {
    "cpp": Backend("cpp", _native_linear, None, ("cpu",), why_not_native),
    "triton": Backend("triton", _triton_linear, None, ("cuda", "cpu"), why_not_triton),
    "reference": Backend("reference", _reference_linear_dense, None, ("cpu", "cuda", "mps", "xpu", "meta")),
}

_linear_op = "pydefend::diag_fisher_linear"


@torch.library.register_fake(_linear_op)
def _linear_fake(grad, x):
    _check_linear(grad, x)
    acc = _acc_dtype(x.dtype)
    return x.new_empty((grad.shape[-1], x.shape[-1]), dtype=acc), x.new_empty((grad.shape[-1],), dtype=acc)


def _linear_device(grad, x):
    _check_linear(grad, x)
    n, l = x.shape[0], math.prod(x.shape[1:-1])
    g3 = grad.reshape(n, l, grad.shape[-1])  # the cpp kernel takes any strides; the others copy when needed
    x3 = x.reshape(n, l, x.shape[-1])
    if x.numel() == 0 or grad.numel() == 0:
        return _reference_linear_dense(g3, x3)
    backend = select("diag_fisher_linear", LINEAR_BACKENDS, x.device)
    if forced_backend() is None and x3.shape[1] == 1:
        backend = LINEAR_BACKENDS["reference"]  # 2-D: the one-GEMM identity beats a per-sample tile
    return backend.forward(g3, x3)


# --------------------------------------------------------------------------- conv2d
def _check_conv_geometry(where: str, kernel_size, stride, padding, dilation):
    for name, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                               ("dilation", dilation, 1)):
        if len(value) != 2 or any(not isinstance(v, int) or v < least for v in value):
            raise ValueError(f"{where}: {name} must be two ints >= {least}, got {tuple(value)}")


def _check_conv(grad, x, kernel_size, stride, padding, dilation, groups):
    if not x.is_floating_point() or grad.dtype != x.dtype:
        raise TypeError(f"diag_fisher_conv2d: grad_out and input must share a floating dtype, got {grad.dtype} "
                        f"and {x.dtype}")
    if x.dim() != 4 or grad.dim() != 4 or grad.shape[0] != x.shape[0]:
        raise ValueError(f"diag_fisher_conv2d: expected input (N, C, H, W) and grad_out (N, O, H', W'), got "
                         f"{tuple(x.shape)} and {tuple(grad.shape)}")
    _check_conv_geometry("diag_fisher_conv2d", kernel_size, stride, padding, dilation)
    if groups < 1 or x.shape[1] % groups or grad.shape[1] % groups:
        raise ValueError(f"diag_fisher_conv2d: {groups} groups do not divide {x.shape[1]} input and "
                         f"{grad.shape[1]} output channels")
    # no output positions (not a negative count) when the dilated kernel is wider than the padded input
    out_hw = [max(0, (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1)
              for d in range(2)]
    if list(grad.shape[2:]) != out_hw:
        raise ValueError(f"diag_fisher_conv2d: grad_out is {tuple(grad.shape[2:])} spatially but this convolution "
                         f"of a {tuple(x.shape[2:])} input gives {tuple(out_hw)}")
    if grad.device != x.device:
        raise ValueError(f"diag_fisher_conv2d: grad_out is on {grad.device} but input is on {x.device}")


def _conv_chunk(c, o, kk, hw, groups, item) -> int:
    """Samples per chunk: unfolded patches (C*k*k*HW') + per-sample gradients (O*C/G*k*k) within the budget."""
    per_sample = c * kk * hw + o * (c // groups) * kk
    return max(1, WORKSPACE_BYTES // (item * max(1, per_sample)))  # max: convolutions without channels


@torch.library.register_fake("pydefend::diag_fisher_conv2d")
def _conv_fake(grad, x, kernel_size, stride, padding, dilation, groups):
    _check_conv(grad, x, kernel_size, stride, padding, dilation, groups)
    acc = _acc_dtype(x.dtype)
    o = grad.shape[1]
    return (x.new_empty((o, x.shape[1] // groups, *kernel_size), dtype=acc), x.new_empty((o,), dtype=acc))


def _reference_conv(grad, x, kernel_size, stride, padding, dilation, groups):
    n, c = x.shape[:2]
    o = grad.shape[1]
    kk = kernel_size[0] * kernel_size[1]
    hw = grad.shape[2] * grad.shape[3]
    acc = _acc_dtype(x.dtype)
    fw = torch.zeros((groups, o // groups, (c // groups) * kk), dtype=acc, device=x.device)
    fb = torch.zeros((o,), dtype=acc, device=x.device)
    chunk = _conv_chunk(c, o, kk, hw, groups, torch.finfo(acc).bits // 8)
    for n0 in range(0, n, chunk):
        xs, g = x[n0:n0 + chunk].to(acc), grad[n0:n0 + chunk].to(acc)
        m = xs.shape[0]
        cols = (F.unfold(xs, kernel_size, dilation=dilation, padding=padding, stride=stride) if c  # (m, C*kk, HW')
                else xs.new_zeros(m, 0, hw))  # unfold refuses inputs without channels
        cols = cols.view(m * groups, (c // groups) * kk, hw)
        gg = g.reshape(m * groups, o // groups, hw)
        per_sample = torch.bmm(gg, cols.transpose(1, 2))  # (m*G, O/G, C/G*kk)
        fw += per_sample.square_().view(m, groups, o // groups, -1).sum(0)
        fb += g.sum((2, 3)).square().sum(0)
    return fw.view(o, c // groups, *kernel_size), fb


def _native_conv(grad, x, kernel_size, stride, padding, dilation, groups):
    return torch.ops.pydefend_native.diag_fisher_conv2d(grad, x, kernel_size, stride, padding, dilation, groups)


CONV_BACKENDS = {
    "cpp": Backend("cpp", _native_conv, None, ("cpu",), why_not_native),
    "reference": Backend("reference", _reference_conv, None, ("cpu", "cuda", "mps", "xpu", "meta")),
}


def _conv_device(grad, x, kernel_size, stride, padding, dilation, groups):
    _check_conv(grad, x, kernel_size, stride, padding, dilation, groups)
    backend = select("diag_fisher_conv2d", CONV_BACKENDS, x.device)
    return backend.forward(grad, x, kernel_size, stride, padding, dilation, groups)


for _device in ("cpu", "cuda"):
    torch.library.register_kernel(_norm_op, _device, _norm_device)
    torch.library.register_kernel(_linear_op, _device, _linear_device)
    torch.library.register_kernel("pydefend::diag_fisher_conv2d", _device, _conv_device)


# --------------------------------------------------------------------------- functional API
def diag_fisher_norm(grad_out, input, mean, invstd):
    """sum_n of squared per-sample affine gradients on (N, A, P, B) views; stats (1|N, 1|A, P/group)."""
    return torch.ops.pydefend.diag_fisher_norm(grad_out, input, mean, invstd)


def diag_fisher_linear(grad_out, input):
    """sum_n of squared per-sample gradients of a Linear's weight (O, I) and bias (O,); dim 0 is the sample."""
    return torch.ops.pydefend.diag_fisher_linear(grad_out, input)


def diag_fisher_conv2d(grad_out, input, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """sum_n of squared per-sample gradients of a Conv2d's weight (O, C/G, kh, kw) and bias (O,)."""
    pair = nn.modules.utils._pair
    return torch.ops.pydefend.diag_fisher_conv2d(grad_out, input, list(pair(kernel_size)), list(pair(stride)),
                                                 list(pair(padding)), list(pair(dilation)), groups)


# --------------------------------------------------------------------------- per-layer adapters
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SUPPORTED = _BN + (nn.LayerNorm, nn.GroupNorm, nn.Linear, nn.Conv2d)


_STATELESS_NORMS = (nn.LayerNorm, nn.GroupNorm)


def _supported(module: nn.Module):
    """True for a supported layer; the base class for a stateless norm whose subclass overrides forward (timm's
    LayerNorm), which is checked against the base forward on its first batch; False otherwise."""
    for base in SUPPORTED:
        if isinstance(module, base):
            if type(module).forward is base.forward:
                return True
            return base if base in _STATELESS_NORMS else False
    return False


def _norm_views(module, x, training_stats: bool):
    """(x as (N, A, P, B), stats mean/invstd (SN, SA, SP), how to view dy the same way)."""
    acc = _acc_dtype(x.dtype)
    n = x.shape[0]
    if isinstance(module, _BN):
        c = x.shape[1]
        if training_stats:
            var, mean = torch.var_mean(x.to(acc) if x.dtype != acc else x, [0] + list(range(2, x.dim())),
                                       unbiased=False)
        else:
            mean, var = module.running_mean.to(acc), module.running_var.to(acc)
        stats = (mean.view(1, 1, c), (var + module.eps).rsqrt().view(1, 1, c))
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            def view(t):
                return t.permute(0, 2, 3, 1).reshape(n, -1, c, 1)
        else:
            def view(t):
                return t.reshape(n, 1, c, -1)
        return view, stats
    if isinstance(module, nn.GroupNorm):
        g = module.num_groups
        var, mean = torch.var_mean(x.to(acc).reshape(n, g, -1), 2, unbiased=False)
        c = x.shape[1]

        def view(t):
            return t.reshape(n, 1, c, -1)
        return view, (mean.view(n, 1, g), (var + module.eps).rsqrt().view(n, 1, g))
    # LayerNorm over the last len(normalized_shape) dims; every leading index of a sample is one row
    d = math.prod(module.normalized_shape)
    var, mean = torch.var_mean(x.to(acc).reshape(n, -1, d), 2, unbiased=False)

    def view(t):
        return t.reshape(n, -1, d, 1)
    return view, (mean.unsqueeze(-1), (var + module.eps).rsqrt().unsqueeze(-1))


def _conv2d_module_fisher(module: nn.Conv2d, x, dy):
    """The conv op on a module's input; padding modes other than zeros and "same"/"valid" are applied per
    chunk of samples (as the module does), so no padded copy of the whole batch is made."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return diag_fisher_conv2d(dy, x, module.kernel_size, module.stride, module.padding, module.dilation,
                                  module.groups)
    if module.padding_mode != "zeros":
        pads, mode = module._reversed_padding_repeated_twice, module.padding_mode
    else:
        pads, mode = [], "constant"  # "same": extra pixel on the right/bottom like conv2d; "valid": none
        for d in (1, 0):
            total = module.dilation[d] * (module.kernel_size[d] - 1) if module.padding == "same" else 0
            pads += [total // 2, total - total // 2]
    c, o = x.shape[1], dy.shape[1]
    chunk = _conv_chunk(c, o, math.prod(module.kernel_size), dy.shape[2] * dy.shape[3], module.groups,
                        torch.finfo(_acc_dtype(x.dtype)).bits // 8)
    fw = fb = 0
    for n0 in range(0, x.shape[0], chunk):
        w, b = diag_fisher_conv2d(dy[n0:n0 + chunk], F.pad(x[n0:n0 + chunk], pads, mode=mode), module.kernel_size,
                                  module.stride, 0, module.dilation, module.groups)
        fw, fb = fw + w, fb + b
    return fw, fb


# --------------------------------------------------------------------------- DiagFisher
ParamSpec = Union[str, Callable[[str, nn.Parameter], bool], Iterable]


class DiagFisher:
    """Diagonal empirical Fisher of a model's parameters, accumulated by module hooks.

        fisher = DiagFisher(model, params="norm")       # "all", "norm", a filter f(name, param) -> bool,
        with fisher.accumulate():                       # or an iterable of names / parameters
            fisher.backward(criterion_none(model(x), y))  # per-sample losses (or a checked scalar)
        scores = fisher.result()                        # {name: sum_n g_n^2 / samples}

    Or `with fisher.accumulate(reduction="mean"): loss.backward()` when the loss is known to be the batch
    mean of per-sample losses ("sum" is the default). See the module docstring for semantics.
    """

    def __init__(self, model: nn.Module, params: ParamSpec = "all"):
        self.model = model
        owners: dict[int, list] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mname, module, pname))
        names = {id(p): name for name, p in model.named_parameters()}
        selected = self._select(model, params, names)
        unsupported, self._layers, self._unverified = [], {}, {}
        for name, p in selected:
            places = owners[id(p)]
            if len({id(m) for _, m, _ in places}) > 1 or len(places) > 1:
                raise ValueError(f"DiagFisher: parameter {name!r} is shared by {len(places)} layers; its per-sample "
                                 f"gradient is a sum over them and cannot be split into per-layer squares")
            mname, module, pname = places[0]
            support = _supported(module)
            if not support or pname not in ("weight", "bias"):
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            if isinstance(module, nn.Conv2d):
                padding = (0, 0) if isinstance(module.padding, str) else module.padding
                _check_conv_geometry(f"DiagFisher: Conv2d {mname or type(model).__name__!r}", module.kernel_size,
                                     module.stride, padding, module.dilation)
            self._layers.setdefault(module, {})[pname] = name
            if support is not True:
                self._unverified[module] = support
        if unsupported:
            raise ValueError("DiagFisher: no per-sample Fisher for " + ", ".join(unsupported) + "; supported layers: "
                             + ", ".join(t.__name__ for t in SUPPORTED) + " (pass params= to leave others out)")
        if not self._layers:
            raise ValueError("DiagFisher: no parameters selected")
        self._buffers = {name: torch.zeros_like(p, dtype=_acc_dtype(p.dtype))
                         for name, p in selected}
        self.samples = 0
        self._accumulating = False
        self._reduction = "sum"
        self._pass_n: Optional[int] = None
        self._last_n: Optional[int] = None
        self._seen: set = set()
        self._ran: set = set()
        self._handles = [model.register_forward_pre_hook(self._start_pass),
                         model.register_forward_hook(self._end_pass)]
        self._handles += [m.register_forward_hook(self._on_forward) for m in self._layers]

    @staticmethod
    def _select(model, params, names):
        named = list(model.named_parameters())
        if params == "all":
            return [(n, p) for n, p in named if p.requires_grad]
        if params == "norm":
            norm_ids = {id(p) for m in model.modules() if isinstance(m, _BN + (nn.LayerNorm, nn.GroupNorm))
                        for p in m.parameters(recurse=False)}
            return [(n, p) for n, p in named if id(p) in norm_ids]
        if isinstance(params, str):
            raise ValueError(f"DiagFisher: params={params!r}; use 'all', 'norm', a filter or an iterable")
        if callable(params):
            return [(n, p) for n, p in named if params(n, p)]
        by_name = dict(named)
        out = []
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"DiagFisher: the model has no parameter named {item!r}")
                out.append((item, by_name[item]))
            elif isinstance(item, torch.Tensor):
                if id(item) not in names:
                    raise ValueError(f"DiagFisher: a parameter of shape {tuple(item.shape)} is not in the model")
                out.append((names[id(item)], item))
            else:
                raise TypeError(f"DiagFisher: params entries must be names or parameters, got {type(item).__name__}")
        return out

    # ----------------------------------------------------------------- hooks
    def _start_pass(self, module, args):
        if self._accumulating and torch.is_grad_enabled():
            self._pass_n = None
            self._seen = set()

    def _end_pass(self, module, args, output):
        self._pass_n = None

    def _on_forward(self, module, args, output):
        if not (self._accumulating and torch.is_grad_enabled()):
            return
        x = args[0]
        if module in self._seen:
            raise RuntimeError(f"DiagFisher: {type(module).__name__} {self._names(module)} ran twice in one pass; "
                               f"its per-sample gradient would be a sum over calls")
        self._seen.add(module)
        self._ran.add(module)
        if not output.requires_grad:
            raise RuntimeError(f"DiagFisher: the output of {self._names(module)} does not require grad, so its "
                               f"gradient never arrives (is the forward under no_grad, or is everything before it "
                               f"frozen with an input that does not require grad?)")
        if module in self._unverified:
            base = self._unverified.pop(module)
            with torch.no_grad():
                same = torch.allclose(base.forward(module, x), output, rtol=1e-4, atol=1e-5)
            if not same:
                raise ValueError(f"DiagFisher: {type(module).__name__} {self._names(module)} overrides forward and "
                                 f"does not compute {base.__name__}; its per-sample gradients are unknown")
        n = x.shape[0]
        if isinstance(module, nn.LayerNorm) and x.dim() <= len(module.normalized_shape):
            raise ValueError(f"DiagFisher: LayerNorm {self._names(module)} input {tuple(x.shape)} has no batch dim")
        if self._pass_n is None:
            self._pass_n = self._last_n = n
            self.samples += n
        elif n != self._pass_n:
            raise RuntimeError(f"DiagFisher: {self._names(module)} sees {n} samples but this pass started with "
                               f"{self._pass_n}; the batch must be dim 0 of every hooked layer's input")
        scale = float(n) if self._reduction == "mean" else 1.0
        x = x.detach()
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            state = (x,)
        else:
            training = isinstance(module, _BN) and (module.training or module.running_mean is None)
            with torch.no_grad():
                state = _norm_views(module, x, training or not isinstance(module, _BN))
            state = (x,) + state
        consumed = []  # this forward's gradient has arrived once; a second one would be added again
        output.register_hook(lambda dy: self._on_grad(module, state, scale, dy, consumed))

    def _on_grad(self, module, state, scale, dy, consumed):
        if consumed:
            raise RuntimeError(f"DiagFisher: a second gradient reached {self._names(module)} from one forward pass "
                               f"(a second backward or a torch.autograd.grad through it) and would add its Fisher "
                               f"again; backpropagate each forward run inside accumulate() exactly once")
        consumed.append(True)
        with torch.no_grad():
            dy = dy.detach()
            x = state[0]
            if isinstance(module, nn.Linear):
                fw, fb = diag_fisher_linear(dy, x)
            elif isinstance(module, nn.Conv2d):
                fw, fb = _conv2d_module_fisher(module, x, dy)
            else:
                view, (mean, invstd) = state[1], state[2]
                fw, fb = diag_fisher_norm(view(dy), view(x), mean, invstd)
            for pname, f in (("weight", fw), ("bias", fb)):
                name = self._layers[module].get(pname)
                if name is not None:
                    buf = self._buffers[name]
                    buf.add_(f.view(buf.shape).to(buf.dtype), alpha=scale * scale)

    def _names(self, module) -> str:
        return "/".join(sorted(set(self._layers[module].values())))

    # ----------------------------------------------------------------- public
    @contextlib.contextmanager
    def accumulate(self, reduction: str = "sum"):
        """Run forward and backward inside; the selected layers' per-sample squared gradients are added."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"DiagFisher: reduction must be 'sum' or 'mean' (the loss over the batch), "
                             f"got {reduction!r}")
        if self._handles is None:
            raise RuntimeError("DiagFisher: detached; create a new DiagFisher")
        self._accumulating, self._reduction, self._pass_n, self._last_n = True, reduction, None, None
        self._ran, self._seen = set(), set()
        try:
            yield self
        finally:
            self._accumulating, self._pass_n = False, None
        missed = [self._names(m) for m in self._layers if m not in self._ran]
        if self._ran and missed:
            warnings.warn("DiagFisher: these layers never ran as modules inside accumulate(), their Fisher entries "
                          "got nothing: " + ", ".join(missed), stacklevel=2)

    def backward(self, loss: torch.Tensor):
        """loss.backward() after checking the loss is a per-sample sum (or the batch mean, under reduction='mean')."""
        n = self._last_pass_batch()
        if loss.dim() == 1 and loss.shape[0] == n:
            if self._reduction != "sum":
                raise ValueError("DiagFisher: per-sample losses are summed; use accumulate(reduction='sum')")
            return loss.sum().backward()
        if loss.dim() != 0:
            raise ValueError(f"DiagFisher: expected per-sample losses of shape ({n},) or a scalar, got "
                             f"{tuple(loss.shape)}")
        found = _loss_reduction(loss, n)
        if found != self._reduction:
            raise ValueError(f"DiagFisher: the loss looks like a {found} over the batch but accumulate() was told "
                             f"reduction={self._reduction!r}")
        loss.backward()

    def _last_pass_batch(self) -> int:
        if not self._accumulating:
            raise RuntimeError("DiagFisher: call backward inside `with fisher.accumulate():`")
        if self._last_n is None:
            raise RuntimeError("DiagFisher: no hooked layer ran inside accumulate(); run the forward inside it")
        return self._last_n

    def result(self) -> dict:
        """{parameter name: Fisher estimate} = accumulated sum_n g_n^2 / samples seen."""
        if self.samples == 0:
            raise RuntimeError("DiagFisher: no samples accumulated yet")
        return {name: buf / self.samples for name, buf in self._buffers.items()}

    def reset(self):
        for buf in self._buffers.values():
            buf.zero_()
        self.samples = 0

    def detach(self):
        """Remove the hooks (buffers and result() stay)."""
        for h in self._handles or ():
            h.remove()
        self._handles = None


_REDUCTION_CODES = {1: "mean", 2: "sum"}


def _loss_reduction(loss: torch.Tensor, n: int) -> str:
    """'sum' or 'mean' when the loss's last op visibly reduces per-sample terms over a batch of n; else raise."""
    fn = loss.grad_fn
    name = type(fn).__name__ if fn is not None else "None"
    if name in ("SumBackward0", "MeanBackward0"):
        sizes = tuple(getattr(fn, "_saved_self_sym_sizes", ()))
        if sizes == (n,):
            return "sum" if name == "SumBackward0" else "mean"
    elif name == "NllLossBackward0":
        weight = getattr(fn, "_saved_weight", None)
        target = fn._saved_target
        code = fn._saved_reduction
        if target.dim() == 1 and target.shape[0] == n and code in _REDUCTION_CODES and (
                code == 2 or (weight is None and not (target == fn._saved_ignore_index).any())):
            return _REDUCTION_CODES[code]
    raise ValueError(f"DiagFisher: cannot tell that this loss (last op {name}) is a sum or mean of {n} per-sample "
                     f"losses; pass per-sample losses (reduction='none') to fisher.backward(), or call "
                     f"loss.backward() yourself under accumulate(reduction=...)")
