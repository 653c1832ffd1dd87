"""Frozen-weight layers whose backward keeps no activations.

When only inputs need gradients (UNIT learns bounds inside a frozen model),
convolution and linear autograd still save their input, and eval-mode
BatchNorm saves its input too. These stand-ins compute the same forward but
keep only their (shared, frozen) weights: the input gradient of a linear map
needs nothing else. `frozen_layers(model)` swaps them into the module tree for
the duration of a block and restores the originals after.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv):
        ctx.conv, ctx.input_shape = conv, x.shape
        return conv._conv_forward(x, conv.weight, conv.bias) if isinstance(conv, nn.Conv2d) else conv(x)

    @staticmethod
    def backward(ctx, grad):
        c = ctx.conv
        fn = torch.nn.grad.conv1d_input if isinstance(c, nn.Conv1d) else torch.nn.grad.conv2d_input
        return fn(ctx.input_shape, c.weight, grad, c.stride, c.padding, c.dilation, c.groups), None


class _StandIn(nn.Module):
    """Holds the original layer and answers for its attributes (a forward may read `layer.weight`)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


class FrozenConv(_StandIn):
    def forward(self, x):
        return _FrozenConv.apply(x, self.original)


class FrozenLinear(_StandIn):
    def forward(self, x):
        # matmul saves the operand that needs no gradient only when the other one does
        linear = self.original
        return F.linear(x, linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


class FrozenBatchNorm(_StandIn):
    """Eval-mode BatchNorm as x·scale + shift with constant scale: backward keeps only `scale`."""

    def forward(self, x):
        bn = self.original
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.detach().view(view) + shift.detach().view(view)


def _stand_in(module: nn.Module):
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros":
        return FrozenConv(module)
    if isinstance(module, nn.Linear):
        return FrozenLinear(module)
    if (isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
            and module.track_running_stats and module.running_var is not None):
        return FrozenBatchNorm(module)
    return None


@contextlib.contextmanager
def frozen_layers(model: nn.Module):
    """Within the block, model's frozen conv/linear/eval-BN modules are the stand-ins above."""
    swapped = []
    for name, original in list(model.named_modules()):
        stand_in = _stand_in(original)
        if not name or stand_in is None or any(p.requires_grad for p in original.parameters()):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, stand_in)
        swapped.append((parent, leaf, original))
    try:
        yield len(swapped)
    finally:
        for parent, leaf, original in reversed(swapped):
            setattr(parent, leaf, original)
