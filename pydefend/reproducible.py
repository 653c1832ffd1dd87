"""Training whose result does not depend on the CPU thread count.

torch's CPU kernels split the batch reduction of a Conv2d or Linear weight gradient between threads, so its last
bits change with ``torch.set_num_threads``, and many steps of fine-tuning turn those bits into another model.
Inside ``thread_count_independent(model)`` every Conv2d and Linear of the model computes its weight and bias
gradients on CPU tensors with ``pydefend_native.conv2d_weight_grad`` / ``linear_weight_grad``: fixed chunks of
the batch, each reduced by one thread, added in order. A Linear's output and input gradient come from
``rows_matmul``, whose row chunks are each one thread's too: on Intel CPUs MKL splits a matrix product's inner
dimension between threads. Every other op in these models was checked to be thread-count independent on AMD
(AVX2) and Intel (AVX-512) CPUs. Results still differ between CPU kernels
(``ATEN_CPU_CAPABILITY``), which round transcendental functions and fused multiply-adds differently.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from ._library import load

CONV_CHUNK = 32  # samples per chunk: the result depends on it, so it is fixed (and batches of up to
#                 32 samples get one thread for their convolution weight gradients)
LINEAR_CHUNK = 512  # rows per chunk


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], groups, [True, False, False])[0]
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = torch.ops.pydefend_native.conv2d_weight_grad(
                grad, x.detach(), weight.detach(), stride, padding, dilation, groups, ctx.has_bias, CONV_CHUNK)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


def _rows_matmul(x: torch.Tensor, other: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K) @ other (K, N) (+ bias), in fixed row chunks of one thread each."""
    out = torch.ops.pydefend_native.rows_matmul(x.detach().reshape(-1, x.shape[-1]), other.detach(),
                                                None if bias is None else bias.detach(), LINEAR_CHUNK)
    return out.view(*x.shape[:-1], other.shape[1])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _rows_matmul(x, weight.t(), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _rows_matmul(grad, weight)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = torch.ops.pydefend_native.linear_weight_grad(
                grad.reshape(-1, grad.shape[-1]), x.detach().reshape(-1, x.shape[-1]), ctx.has_bias, LINEAR_CHUNK)
        return grad_x, grad_w, grad_b if ctx.has_bias else None


def _conv_forward(self, x):
    if x.device.type != "cpu" or x.dim() != 4:
        return type(self).forward(self, x)
    return _Conv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _linear_forward(self, x):
    if x.device.type != "cpu" or x.dim() < 2:
        return type(self).forward(self, x)
    return _Linear.apply(x, self.weight, self.bias)


def _covered(module: nn.Module):
    """The thread-count-independent forward for this module, or None (it keeps torch's own)."""
    if type(module) is nn.Linear:
        return _linear_forward
    if (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
        return _conv_forward
    return None


@contextlib.contextmanager
def thread_count_independent(model: nn.Module):
    """Within the block, the CPU weight gradients of ``model``'s Conv2d and Linear layers are bit-identical for
    any thread count. Subclasses, string padding and non-zero padding modes keep torch's own gradients."""
    load()
    patched = []
    for module in model.modules():
        forward = _covered(module)
        if forward is not None and "forward" not in vars(module):
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
