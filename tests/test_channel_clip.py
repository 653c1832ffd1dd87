"""channel_clip against its float64 reference, on every backend this machine runs."""
import os

import pytest
import torch

from pydefend import BackendUnavailable, use_backend
from pydefend.ops.channel_clip import ChannelClip, channel_clip, channel_clip_reference

CPU_BACKENDS = ["cpp", "reference"]
# (atol, rtol) for y and grad_x (exact selections), and rtol for grad_upper (a sum)
TOLERANCE = {torch.float64: (0.0, 1e-12), torch.float32: (0.0, 1e-5), torch.float16: (0.0, 2e-3),
             torch.bfloat16: (0.0, 1.6e-2)}

# (shape, channel_dim): 1, primes, non-powers of two, 2-D, sequence-shaped
SHAPES = [((1, 1), 1), ((3, 5), 1), ((2, 7, 5, 3), 1), ((4, 13, 1, 1), 1), ((2, 3, 17), 1),
          ((2, 11, 6), -1), ((1, 33, 8, 9), 1), ((5, 2, 3, 4), 2)]


def make_inputs(shape, channel_dim, per_element, dtype, layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64) * 2
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-dense view
        x = torch.randn(shape[:-1] + (shape[-1] * 2,), dtype=torch.float64)[..., ::2] * 2
    cd = channel_dim % len(shape)
    u_shape = shape[1:] if per_element else (shape[cd],)
    upper = torch.rand(u_shape, dtype=torch.float64) * 2 - 0.5
    return x.to(dtype), upper.to(dtype), cd


def run(fn, x, upper, cd, relu, grad):
    xa = x.detach().clone().requires_grad_()
    ua = upper.detach().clone().requires_grad_()
    y = fn(xa, ua, cd, relu)
    y.backward(grad)
    return y.detach(), xa.grad, ua.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape,channel_dim", SHAPES)
@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_matches_reference(backend, dtype, shape, channel_dim, per_element, relu):
    if per_element and len(shape) < 2:
        pytest.skip("per-element bounds need a batch dim")
    x, upper, cd = make_inputs(shape, channel_dim, per_element, dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    with use_backend(backend):
        y, gx, gu = run(channel_clip, x, upper, cd, relu, grad)
    # oracle: float64 on the same (already rounded) values
    yr, gxr, gur = run(channel_clip_reference, x.double(), upper.double(), cd, relu, grad.double())
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), yr.to(dtype).double(), atol=atol, rtol=0)
    torch.testing.assert_close(gx.double(), gxr.to(dtype).double(), atol=atol, rtol=0)
    scale = grad.double().abs().sum() / max(1, upper.numel())  # size of one reduced sum
    torch.testing.assert_close(gu.double(), gur, atol=float(rtol * scale + 1e-12), rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_layouts(backend, layout, per_element, relu):
    x, upper, cd = make_inputs((3, 6, 5, 7), 1, per_element, torch.float32, layout)
    grad = torch.randn(3, 6, 5, 7).to(memory_format=torch.channels_last)  # a third layout for dy
    with use_backend(backend):
        y, gx, gu = run(channel_clip, x, upper, cd, relu, grad)
    yr, gxr, gur = run(channel_clip_reference, x.double(), upper.double(), cd, relu, grad.double())
    torch.testing.assert_close(y.double(), yr, atol=0, rtol=0)
    torch.testing.assert_close(gx.double(), gxr, atol=0, rtol=0)
    torch.testing.assert_close(gu.double(), gur, atol=1e-4, rtol=1e-5)
    if layout == "channels_last":
        assert y.stride() == x.stride(), "output keeps the input's memory format"


def test_tie_rule_sends_gradient_to_bound():
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    upper = torch.tensor([2.0, 2.0, 2.0], requires_grad=True)
    channel_clip(x, upper, channel_dim=1).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 0.0]]  # x == u counts as clipped
    assert upper.grad.tolist() == [0.0, 1.0, 1.0]


def test_relu_with_nonpositive_bound_clips_everything():
    x = torch.tensor([[-1.0, 0.5], [2.0, -3.0]], requires_grad=True)
    upper = torch.tensor([-0.5, 0.0], requires_grad=True)
    y = channel_clip(x, upper, 1, relu=True)
    assert y.tolist() == [[-0.5, 0.0], [-0.5, 0.0]]  # min(max(x, 0), u) = u when u <= 0
    y.sum().backward()
    assert x.grad.abs().sum() == 0 and upper.grad.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck(relu):
    x, upper, cd = make_inputs((3, 4, 5), 1, False, torch.float64)
    # keep inputs off the kinks (x == u, and x == 0 with the ReLU)
    while True:
        near = ((x - upper.view(1, -1, 1)).abs() < 1e-3) | (relu & (x.abs() < 1e-3))
        if not near.any():
            break
        x = torch.where(near, x + 0.01, x)
    assert torch.autograd.gradcheck(lambda a, b: channel_clip(a, b, cd, relu),
                                    (x.requires_grad_(), upper.requires_grad_()))


@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_opcheck(per_element, relu):
    x, upper, cd = make_inputs((2, 5, 3, 4), 1, per_element, torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.pydefend.channel_clip_fwd.default,
                          (x.requires_grad_(), upper.requires_grad_(), cd, relu))
    y, mask = torch.ops.pydefend.channel_clip_fwd(x.detach(), upper.detach(), cd, relu)
    torch.library.opcheck(torch.ops.pydefend.channel_clip_bwd.default,
                          (torch.randn_like(y), mask, upper.detach(), cd, relu, [0, 2, 3, 1]))


def test_compile_fullgraph_forward_backward(inductor_vector_isa):
    x, upper, cd = make_inputs((4, 6, 5, 5), 1, False, torch.float32)

    def f(a, b):
        return (channel_clip(a, b, 1, relu=True) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    xa, ua = x.clone().requires_grad_(), upper.clone().requires_grad_()
    compiled(xa, ua).backward()
    xb, ub = x.clone().requires_grad_(), upper.clone().requires_grad_()
    f(xb, ub).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)
    torch.testing.assert_close(ua.grad, ub.grad, atol=0, rtol=0)


@pytest.mark.parametrize("per_element", [False, True])
def test_bound_gradient_is_deterministic(per_element):
    x, upper, cd = make_inputs((64, 37, 9, 9), 1, per_element, torch.float32)
    grad = torch.randn(x.shape)
    first = run(channel_clip, x, upper, cd, False, grad)[2]
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            assert torch.equal(run(channel_clip, x, upper, cd, False, grad)[2], first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("relu,bits", [(False, 1), (True, 2)])
def test_saves_packed_mask_not_input(relu, bits):
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    upper = torch.rand(16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = channel_clip(x, upper, 1, relu)
    activation_state = [t for t in saved if t is not upper and t.data_ptr() != upper.data_ptr()]
    assert len(activation_state) == 1
    mask = activation_state[0]
    assert mask.dtype == torch.uint8 and mask.numel() == x.numel() * bits // 8
    assert mask.numel() * 32 // bits == x.numel() * x.element_size()  # 1/32 (1/16) of fp32
    y.sum().backward()  # and it is enough for backward


def test_eager_composite_saves_more():
    """The baseline the benchmark compares against keeps at least the input."""
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    upper = torch.rand(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        torch.minimum(torch.relu(x), upper.view(1, -1, 1, 1))
    assert sum(saved) >= x.numel() * 4


def test_module():
    clip = ChannelClip(6, relu=True, init=0.5)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(clip(x), x.clamp(0, 0.5))
    clip(x).sum().backward()
    assert clip.upper.grad.shape == (6,)
    assert "relu=True" in repr(clip)
    per_element = ChannelClip((6, 4, 4))
    torch.testing.assert_close(per_element(x), x)  # +inf: no clipping


def test_upper_is_cast_to_input_dtype():
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    upper = torch.rand(3, dtype=torch.float32, requires_grad=True)
    channel_clip(x, upper).float().sum().backward()
    assert upper.grad.dtype == torch.float32


# --------------------------------------------------------------------------- bad input
def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"must be \(4,\) for channel_dim=1 of x \(2, 4, 3\), or pass channel_dim=2"):
        channel_clip(torch.randn(2, 4, 3), torch.rand(3))
    with pytest.raises(ValueError, match=r"expected \(4,\) for one bound per channel .* or \(4, 3\) for one bound "
                                         r"per element"):
        channel_clip(torch.randn(2, 4, 3), torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"expected \(4,\) for one bound per channel \(dim 1 of x \(2, 4\)\)$"):
        channel_clip(torch.randn(2, 4), torch.rand(1, 4))  # a 2-D x has no per-element form beyond per channel
    with pytest.raises(ValueError, match="out of range"):
        channel_clip(torch.randn(2, 4), torch.rand(4), channel_dim=3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_dim_upper_is_always_per_channel(backend):
    """A (F,) bound of a (B, F) input with channel_dim=0 used to clip columns when B != F and rows when B == F."""
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"a 1-D upper holds one bound per channel and must be \(3,\) for "
                                             r"channel_dim=0 of x \(3, 5\), or pass channel_dim=1 \(the dim of size 5\)"):
            channel_clip(torch.randn(3, 5), torch.rand(5), channel_dim=0)
        x, upper = torch.randn(4, 4) * 2, torch.rand(4)
        rows = channel_clip(x, upper, channel_dim=0)
        columns = channel_clip(x, upper, channel_dim=1)
    assert torch.equal(rows, torch.minimum(x, upper[:, None]))
    assert torch.equal(columns, torch.minimum(x, upper[None, :]))
    assert torch.equal(channel_clip_reference(x, upper, 0), rows)


@pytest.mark.parametrize("relu", [False, True])
def test_double_backward_is_refused(relu):
    """The second-order gradient used to be all zeros with only a warning (the backward op had no autograd)."""
    x, upper, cd = make_inputs((3, 4, 5), 1, False, torch.float64)
    x, upper = x.requires_grad_(), upper.requires_grad_()
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)  # grad_out depends on w: d(grad_x)/dw != 0
    gx, gu = torch.autograd.grad((channel_clip(x, upper, cd, relu) * w).sum(), (x, upper), create_graph=True)
    fx, fu = torch.autograd.grad((channel_clip(x, upper, cd, relu) * w).sum(), (x, upper))
    assert torch.equal(gx, fx) and torch.equal(gu, fu), "create_graph=True leaves first order unchanged"
    with pytest.raises(RuntimeError, match="pydefend.channel_clip is not twice differentiable"):
        torch.autograd.grad(gx.square().sum() + gu.sum(), (x, upper, w))


def test_integer_dtype():
    with pytest.raises(TypeError, match="floating-point"):
        channel_clip(torch.ones(2, 3, dtype=torch.int32), torch.ones(3, dtype=torch.int32))


def test_different_devices():
    with pytest.raises(ValueError, match="is on cpu but upper is on meta"):
        torch.ops.pydefend.channel_clip_fwd(torch.randn(2, 3), torch.rand(3, device="meta"), 1, False)


def test_empty_tensor():
    x = torch.randn(0, 3, 4, requires_grad=True)
    upper = torch.rand(3, requires_grad=True)
    y = channel_clip(x, upper)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert upper.grad.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf(backend):
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]], requires_grad=True)
    upper = torch.tensor([1.0, 1.0, 1.0, float("inf")], requires_grad=True)
    with use_backend(backend):
        y = channel_clip(x, upper)
        y.sum().backward()
    assert y[0, 0].isnan() and y[0, 1:].tolist() == [1.0, -float("inf"), 1.0]
    assert x.grad.tolist() == [[1.0, 0.0, 1.0, 1.0]]  # NaN passes its gradient; +inf bound never clips
    assert upper.grad.tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="upper contains NaN"):
        channel_clip(torch.randn(2, 2), torch.tensor([1.0, float("nan")]))


# --------------------------------------------------------------------------- backend choice
def test_forced_backend_that_cannot_run_says_why():
    x, upper = torch.randn(2, 3), torch.rand(3)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda does not run cpu tensors"):
        channel_clip(x, upper)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with use_backend("triton"), pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1|not installed"):
            channel_clip(x, upper)
    with pytest.raises(ValueError, match="unknown pydefend backend"):
        with use_backend("fast"):
            pass


def test_env_var_forces_backend(monkeypatch):
    x, upper = torch.randn(2, 3), torch.rand(3)
    monkeypatch.setenv("PYDEFEND_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable):
        channel_clip(x, upper)
    with use_backend("reference"):  # the context manager wins over the variable
        channel_clip(x, upper)
    monkeypatch.setenv("PYDEFEND_BACKEND", "auto")
    channel_clip(x, upper)
