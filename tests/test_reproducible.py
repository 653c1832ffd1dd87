"""Thread-count-independent Conv2d / Linear weight gradients (pydefend.reproducible)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pydefend.reproducible import _Conv2d, _Linear, thread_count_independent

CONVS = [  # (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, bias)
    (13, 3, 5, 9, 7, 3, 1, 1, 1, 1, True),
    (5, 4, 6, 8, 8, 3, 2, 0, 1, 2, False),
    (1, 2, 3, 11, 6, (3, 1), (1, 2), (2, 0), 2, 1, True),
    (17, 6, 6, 5, 5, 1, 1, 0, 1, 6, True),
]


def _grads(module, x):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("shape", CONVS)
def test_conv_gradients_match_float64_autograd(shape):
    n, cin, cout, h, w, k, stride, padding, dilation, groups, bias = shape
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
    x = torch.randn(n, cin, h, w)
    expected = _grads(copy.deepcopy(conv).double(), x.double())
    with thread_count_independent(conv):
        got = _grads(conv, x)
    assert "forward" not in vars(conv)  # restored
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lead,fan_in,fan_out,bias", [((7,), 5, 3, True), ((3, 1025), 9, 4, False)])
def test_linear_gradients_match_float64_autograd(lead, fan_in, fan_out, bias):
    linear = nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(*lead, fan_in)
    expected = _grads(copy.deepcopy(linear).double(), x.double())
    with thread_count_independent(linear):
        got = _grads(linear, x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def test_bit_identical_for_any_thread_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 8 * 8, 10)).train()
    x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 10, (96,))
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            model.zero_grad(set_to_none=True)
            with thread_count_independent(model):
                F.cross_entropy(model(x), y).backward()
            runs.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_gradcheck_in_float64():
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _Conv2d.apply(x, w, b, (2, 1), (1, 0), (1, 1), 1), (x, w, b))
    a = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: _Linear.apply(a, v, None), (a, v))


def test_only_plain_layers_are_covered():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), MyConv(2, 2, 1), nn.Conv2d(2, 2, 3, padding_mode="reflect"))
    with thread_count_independent(model):
        assert all("forward" not in vars(m) for m in model)
