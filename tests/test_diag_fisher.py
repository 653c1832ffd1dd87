"""diag_fisher: the ops against float64 oracles, DiagFisher against vmap(grad), autograd and BackPACK."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType
from torch.func import functional_call, grad, vmap

from pydefend import BackendUnavailable, use_backend
from pydefend.ops import diag_fisher as df
from pydefend.ops.diag_fisher import DiagFisher, diag_fisher_conv2d, diag_fisher_linear, diag_fisher_norm

NORM_BACKENDS = ["cpp", "reference"]
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (N, A, P, B, stats shape): BN NCHW, BN channels-last, LN, GN, 1s and primes
NORM_SHAPES = [(4, 1, 6, 25, (1, 1, 6)), (3, 35, 5, 1, (1, 1, 5)), (5, 7, 16, 1, (5, 7, 1)),
               (2, 1, 12, 9, (2, 1, 4)), (1, 1, 1, 1, (1, 1, 1)), (13, 1, 3, 70, (1, 1, 3)),
               (67, 3, 130, 1, (67, 3, 1))]


def norm_inputs(shape, dtype):
    n, a, p, b, st = shape
    x = (torch.randn(n, a, p, b, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(n, a, p, b, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(st, dtype=torch.float64).to(acc)
    invstd = (torch.rand(st, dtype=torch.float64) + 0.5).to(acc)
    return dy, x, mean, invstd


def norm_oracle(dy, x, mean, invstd):
    """Per-sample gradients written out in float64 by loops over the stat groups."""
    n, a, p, b = x.shape
    group = p // mean.shape[2]
    gw = torch.zeros(n, p, dtype=torch.float64)
    gb = torch.zeros(n, p, dtype=torch.float64)
    for c in range(p):
        m = mean.double()[:, :, c // group].unsqueeze(-1)
        r = invstd.double()[:, :, c // group].unsqueeze(-1)
        xhat = (x.double()[:, :, c] - m) * r
        gw[:, c] = (dy.double()[:, :, c] * xhat).sum((1, 2))
        gb[:, c] = dy.double()[:, :, c].sum((1, 2))
    return (gw ** 2).sum(0), (gb ** 2).sum(0)


def assert_fisher_close(got, want, rtol):
    # squares summed: relative to the largest entry (small entries may cancel inside a sample)
    scale = float(want.abs().max()) + 1e-30
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize("dtype", list(RTOL))
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_norm_matches_oracle(backend, dtype, shape):
    dy, x, mean, invstd = norm_inputs(shape, dtype)
    with use_backend(backend):
        fw, fb = diag_fisher_norm(dy, x, mean, invstd)
    assert fw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ow, ob = norm_oracle(dy, x, mean, invstd)
    assert_fisher_close(fw, ow, RTOL[dtype])
    assert_fisher_close(fb, ob, RTOL[dtype])


def test_norm_non_contiguous_inputs():
    dy, x, mean, invstd = norm_inputs((4, 3, 8, 5, (1, 1, 8)), torch.float32)
    xt = x.transpose(1, 3).contiguous().transpose(1, 3)  # same values, other memory order
    dyt = torch.stack([dy, -dy], -1)[..., 0]  # a non-dense view
    torch.testing.assert_close(dyt, dy)
    fw, fb = diag_fisher_norm(dyt, xt, mean, invstd)
    ow, ob = norm_oracle(dy, x, mean, invstd)
    assert_fisher_close(fw, ow, RTOL[torch.float32])
    assert_fisher_close(fb, ob, RTOL[torch.float32])


def test_norm_deterministic_across_threads():
    dy, x, mean, invstd = norm_inputs((64, 1, 37, 81, (1, 1, 37)), torch.float32)
    first = diag_fisher_norm(dy, x, mean, invstd)
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            again = diag_fisher_norm(dy, x, mean, invstd)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- linear / conv ops
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, (), 5, 3), (6, (4,), 9, 2), (3, (2, 5), 4, 6), (1, (), 1, 1)], ids=str)
def test_linear_matches_per_sample_einsum(backend, dtype, shape, monkeypatch):
    n, mid, i, o = shape
    monkeypatch.setattr(df, "WORKSPACE_BYTES", 256)  # several reference chunks even at these sizes
    x = torch.randn(n, *mid, i, dtype=torch.float64).to(dtype)
    dy = torch.randn(n, *mid, o, dtype=torch.float64).to(dtype)
    with use_backend(backend):
        fw, fb = diag_fisher_linear(dy, x)
    xs, gs = x.double().reshape(n, -1, i), dy.double().reshape(n, -1, o)
    per_sample = torch.einsum("nlo,nli->noi", gs, xs)
    assert_fisher_close(fw, per_sample.square().sum(0), RTOL[dtype] * 10)
    assert_fisher_close(fb, gs.sum(1).square().sum(0), RTOL[dtype] * 10)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("cfg", [dict(k=3, s=1, p=1, d=1, g=1), dict(k=(3, 2), s=2, p=(0, 1), d=1, g=1),
                                 dict(k=3, s=1, p=2, d=2, g=2), dict(k=1, s=1, p=0, d=1, g=3)], ids=str)
def test_conv2d_matches_per_sample_autograd(backend, cfg, monkeypatch):
    monkeypatch.setattr(df, "WORKSPACE_BYTES", 4096)  # reference chunks of one or two samples
    conv = nn.Conv2d(6, 12, cfg["k"], cfg["s"], cfg["p"], cfg["d"], cfg["g"]).double()
    x = torch.randn(5, 6, 9, 8, dtype=torch.float64)
    dy = torch.randn_like(conv(x))
    with use_backend(backend):
        fw, fb = diag_fisher_conv2d(dy, x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    want_w, want_b = torch.zeros_like(conv.weight), torch.zeros_like(conv.bias)
    for n in range(5):
        gw, gb = torch.autograd.grad(conv(x[n:n + 1]), (conv.weight, conv.bias), dy[n:n + 1])
        want_w += gw ** 2
        want_b += gb ** 2
    assert_fisher_close(fw, want_w, 1e-10)
    assert_fisher_close(fb, want_b, 1e-10)


# The cpp kernel's blocks: 6-row micro-tiles, 16-column (8 for float64) micro-tiles, 128-position chunks
# (whole output rows), row blocks of up to 384. Shapes below cross each of these boundaries.
CONV_CASES = [  # (N, C, O, H, W, kernel, stride, padding, dilation, groups)
    (3, 5, 7, 11, 13, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 6, 10, 20, 23, (3, 2), (2, 1), (0, 2), (1, 2), 2),   # stride, asymmetric padding, dilation, groups
    (4, 3, 13, 14, 30, (5, 5), (1, 1), (2, 2), (1, 1), 1),   # 420 positions: chunked, rows of 30
    (2, 12, 12, 7, 9, (3, 3), (2, 2), (3, 3), (2, 2), 4),    # padding wider than the kernel reach
    (5, 16, 400, 3, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),   # two row blocks
    (1, 4, 8, 6, 6, (2, 2), (3, 3), (0, 0), (1, 1), 2),
    (2, 3, 6, 1, 200, (1, 3), (1, 1), (0, 1), (1, 1), 3),    # one output row longer than a chunk
]


def conv_reference(dy, x, kernel, stride, padding, dilation, groups):
    with use_backend("reference"):
        return diag_fisher_conv2d(dy.double(), x.double(), kernel, stride, padding, dilation, groups)


def conv_inputs(case, dtype, gen):
    n, c, o, h, w, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen).to(dtype)
    out = [(size + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, size in enumerate((h, w))]
    dy = torch.randn(n, o, *out, dtype=torch.float64, generator=gen).to(dtype)
    return dy, x


# every input is exact in float32, so all dtypes but float64 are held to float32 accumulation accuracy
CPP_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.mark.parametrize("dtype", list(CPP_RTOL))
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_cpp_conv_matches_float64_reference(case, dtype):
    gen = torch.Generator().manual_seed(100 + case)
    dy, x = conv_inputs(CONV_CASES[case], dtype, gen)
    args = CONV_CASES[case][5:]
    with use_backend("cpp"):
        fw, fb = diag_fisher_conv2d(dy, x, *args)
    assert fw.dtype == fb.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_w, want_b = conv_reference(dy, x, *args)
    assert fw.shape == want_w.shape and fb.shape == want_b.shape
    assert_fisher_close(fw, want_w, CPP_RTOL[dtype])
    assert_fisher_close(fb, want_b, CPP_RTOL[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "strided", "channels_last_dy_only"])
def test_cpp_conv_memory_layouts_give_identical_bits(layout):
    gen = torch.Generator().manual_seed(7)
    case = CONV_CASES[1]
    dy, x = conv_inputs(case, torch.float32, gen)
    with use_backend("cpp"):
        want = diag_fisher_conv2d(dy, x, *case[5:])
        if layout == "strided":  # views into larger tensors, innermost stride 2
            big_x = torch.zeros(*x.shape[:3], 2 * x.shape[3])
            big_x[..., ::2] = x
            big_dy = torch.zeros(dy.shape[0], 2 * dy.shape[1], *dy.shape[2:]).transpose(2, 3).contiguous()
            dy_view = big_dy.transpose(2, 3)[:, ::2]
            dy_view.copy_(dy)
            dy2, x2 = dy_view, big_x[..., ::2]
            assert not x2.is_contiguous() and not dy2.is_contiguous()
        elif layout == "channels_last":
            dy2, x2 = dy.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        else:
            dy2, x2 = dy.to(memory_format=torch.channels_last), x
        got = diag_fisher_conv2d(dy2, x2, *case[5:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", list(CPP_RTOL))
@pytest.mark.parametrize("shape", [(3, (5,), 7, 9), (2, (150,), 20, 33), (4, (3, 4), 17, 401), (2, (1,), 8, 6)],
                         ids=str)
def test_cpp_linear_matches_float64_einsum(dtype, shape):
    n, mid, i, o = shape
    gen = torch.Generator().manual_seed(i * o)
    x = torch.randn(n, *mid, i, dtype=torch.float64, generator=gen).to(dtype)
    dy = torch.randn(n, *mid, o, dtype=torch.float64, generator=gen).to(dtype)
    with use_backend("cpp"):
        fw, fb = diag_fisher_linear(dy, x)
        again = diag_fisher_linear(dy.transpose(0, -1).contiguous().transpose(0, -1), x)  # strided grad_out
    xs, gs = x.double().reshape(n, -1, i), dy.double().reshape(n, -1, o)
    assert_fisher_close(fw, torch.einsum("nlo,nli->noi", gs, xs).square().sum(0), CPP_RTOL[dtype])
    assert_fisher_close(fb, gs.sum(1).square().sum(0), CPP_RTOL[dtype])
    assert torch.equal(again[0], fw) and torch.equal(again[1], fb)


def per_sample_fisher_vmap(module, x, dy):
    """sum_n g_n^2 from torch.func per-sample gradients of <module(x_n), dy_n>."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p, xi, dyi):
        return (functional_call(module, p, (xi[None],)) * dyi[None]).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, dy)
    return per_sample["weight"].square().sum(0), per_sample["bias"].square().sum(0)


@pytest.mark.parametrize("case", [0, 1, 3])
def test_cpp_conv_matches_vmap_grad(case):
    n, c, o, h, w, k, s, p, d, g = CONV_CASES[case]
    conv = nn.Conv2d(c, o, k, s, p, d, g).double()
    dy, x = conv_inputs(CONV_CASES[case], torch.float64, torch.Generator().manual_seed(case))
    want_w, want_b = per_sample_fisher_vmap(conv, x, dy)
    with use_backend("cpp"):
        fw, fb = diag_fisher_conv2d(dy, x, k, s, p, d, g)
    assert_fisher_close(fw, want_w, 1e-12)
    assert_fisher_close(fb, want_b, 1e-12)


def test_cpp_linear_matches_vmap_grad():
    lin = nn.Linear(19, 23).double()
    x, dy = torch.randn(5, 3, 7, 19, dtype=torch.float64), torch.randn(5, 3, 7, 23, dtype=torch.float64)
    want_w, want_b = per_sample_fisher_vmap(lin, x, dy)
    with use_backend("cpp"):
        fw, fb = diag_fisher_linear(dy, x)
    assert_fisher_close(fw, want_w, 1e-12)
    assert_fisher_close(fb, want_b, 1e-12)


def test_cpp_deterministic_across_threads():
    gen = torch.Generator().manual_seed(3)
    dy, x = conv_inputs((9, 32, 70, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, gen)
    seq_x, seq_dy = torch.randn(6, 140, 50, generator=gen), torch.randn(6, 140, 45, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3, 4):  # the tiling follows the thread count, the bits must not
            torch.set_num_threads(t)
            with use_backend("cpp"):
                results.append(diag_fisher_conv2d(dy, x, 3, 1, 1) + diag_fisher_linear(seq_dy, seq_x))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_cpp_native_bad_input():
    conv = torch.ops.pydefend_native.diag_fisher_conv2d
    x, dy = torch.randn(2, 4, 6, 6), torch.randn(2, 6, 6, 6)
    with pytest.raises(RuntimeError, match="share a floating dtype"):
        conv(dy.double(), x, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="share a floating dtype"):
        conv(dy.long(), x.long(), [3, 3], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"expected input \(N, C, H, W\)"):
        conv(dy[0], x[0], [3, 3], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="stride, dilation must be >= 1"):
        conv(dy, x, [3, 3], [0, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="groups do not divide"):
        conv(dy, x, [3, 3], [1, 1], [1, 1], [1, 1], 4)
    with pytest.raises(RuntimeError, match="gives 4 along dim 2"):
        conv(dy, x, [3, 3], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"expected input \(N, L, I\) and grad_out \(N, L, O\)"):
        torch.ops.pydefend_native.diag_fisher_linear(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(RuntimeError, match="share a floating dtype"):
        torch.ops.pydefend_native.diag_fisher_linear(torch.randn(2, 3, 4), torch.randn(2, 3, 4).half())


def test_cpp_empty_inputs():
    with use_backend("cpp"):
        fw, fb = diag_fisher_conv2d(torch.randn(0, 4, 5, 5), torch.randn(0, 3, 5, 5), 3, padding=1)
        assert fw.shape == (4, 3, 3, 3) and fw.abs().sum() == 0 and fb.shape == (4,) and fb.abs().sum() == 0
        dy = torch.randn(2, 4, 5, 5)
        fw, fb = diag_fisher_conv2d(dy, torch.randn(2, 0, 5, 5), 3, padding=1)
    assert fw.shape == (4, 0, 3, 3)  # no input channels: the bias still has a Fisher
    assert_fisher_close(fb, dy.double().sum((2, 3)).square().sum(0), 2e-5)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_ops_opcheck(backend):
    dy, x, mean, invstd = norm_inputs((3, 2, 6, 5, (1, 1, 3)), torch.float32)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.pydefend.diag_fisher_norm.default, (dy, x, mean, invstd))
        torch.library.opcheck(torch.ops.pydefend.diag_fisher_linear.default,
                              (torch.randn(4, 3, 5), torch.randn(4, 3, 7)))
        torch.library.opcheck(torch.ops.pydefend.diag_fisher_conv2d.default,
                              (torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1], 1))
        torch.library.opcheck(torch.ops.pydefend.diag_fisher_conv2d.default,
                              (torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last),
                               torch.randn(2, 6, 6, 5).to(memory_format=torch.channels_last), [2, 3], [2, 1],
                               [0, 0], [1, 1], 2))


def test_compile_fullgraph(inductor_vector_isa):
    dy, x, mean, invstd = norm_inputs((4, 1, 6, 9, (1, 1, 6)), torch.float32)

    def f(dy, x, mean, invstd, g, a):
        nw, nb = diag_fisher_norm(dy, x, mean, invstd)
        lw, lb = diag_fisher_linear(g, a)
        return nw.sum() + nb.sum() + lw.sum() + lb.sum()

    args = (dy, x, mean, invstd, torch.randn(2, 7, 5), torch.randn(2, 7, 3))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))


# --------------------------------------------------------------------------- models
class PreActBlock(nn.Module):
    """PreAct-ResNet: BN before conv, identity shortcut."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(out))) + x


class TransformerBlock(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, length, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def make_model(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7), nn.ReLU(),
                             nn.Linear(7, 3)), (12,)
    if kind == "cnn_bn":
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                             nn.Conv2d(6, 4, 3, stride=2, padding="valid", bias=False), nn.GroupNorm(2, 4),
                             nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"), nn.Flatten(),
                             nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)), (3, 8, 8)
    if kind == "preact":
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PreActBlock(4), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (3, 6, 6)
    return nn.Sequential(TransformerBlock(), nn.LayerNorm(8), nn.Flatten(), nn.Linear(5 * 8, 3)), (5, 8)


def randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def fisher_of(model, x, t, params="all", reduction="sum"):
    fisher = DiagFisher(model, params)
    with fisher.accumulate(reduction=reduction):
        out = model(x)
        if reduction == "sum":
            fisher.backward(F.cross_entropy(out, t, reduction="none"))
        else:
            fisher.backward(F.cross_entropy(out, t))
    return fisher.result()


MODELS = ["mlp", "cnn_bn", "preact", "transformer"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_eval_mode_matches_vmap_grad(kind, reduction):
    model, shape = make_model(kind)
    model = randomise(model.double()).eval()
    x, t = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fisher_of(model, x, t, reduction=reduction)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, ti):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, t)
    assert set(got) == set(params)
    for name, g in per_sample.items():
        assert_fisher_close(got[name], g.square().mean(0), 1e-10)


def per_sample_terms(model, x, t):
    """Oracle for the train-mode definition: g_n = autograd's gradient of the batch loss w.r.t. each layer's
    parameters with the layer's output gradient restricted to sample n (a parameter copy used only by n)."""
    outputs = []

    def keep(module, args, out):
        outputs.append((module, out))
        return out * 1  # later in-place ops hit the copy, `out` stays the layer's own output

    layers = [m for m in model.modules() if df._supported(m)]
    handles = [m.register_forward_hook(keep) for m in layers]
    loss = F.cross_entropy(model(x), t, reduction="sum")
    for h in handles:
        h.remove()
    dys = torch.autograd.grad(loss, [o for _, o in outputs], retain_graph=True)
    names = {id(p): n for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for (module, out), dy in zip(outputs, dys):
        params = list(module.parameters(recurse=False))
        for n in range(x.shape[0]):
            mask = torch.zeros_like(dy)
            mask[n] = 1
            grads = torch.autograd.grad(out, params, dy * mask, retain_graph=True)
            for p, g in zip(params, grads):
                fisher[names[id(p)]] += g.square()
    return {k: v / x.shape[0] for k, v in fisher.items()}


@pytest.mark.parametrize("kind", ["cnn_bn", "preact"])
def test_train_mode_matches_per_sample_terms(kind):
    model, shape = make_model(kind)
    model = randomise(model.double()).train()
    x, t = torch.randn(5, *shape, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = per_sample_terms(model, x, t)
    got = fisher_of(model, x, t)
    for name in want:
        assert_fisher_close(got[name], want[name], 1e-10)


def test_norm_filter_and_accumulation_over_batches():
    model, shape = make_model("cnn_bn")
    model = randomise(model.double()).eval()
    x, t = torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 3, (8,))
    fisher = DiagFisher(model, params="norm")
    with fisher.accumulate():
        fisher.backward(F.cross_entropy(model(x[:3]), t[:3], reduction="none"))
        fisher.backward(F.cross_entropy(model(x[3:]), t[3:], reduction="none"))
    assert fisher.samples == 8
    whole = fisher_of(model, x, t, params="norm")
    assert set(whole) == {"1.weight", "1.bias", "4.weight", "4.bias", "8.weight", "8.bias"}
    for name, value in fisher.result().items():
        assert_fisher_close(value, whole[name], 1e-10)
    fisher.reset()
    assert fisher.samples == 0 and all(v.abs().sum() == 0 for v in fisher._buffers.values())
    fisher.detach()
    with pytest.raises(RuntimeError, match="detached"):
        with fisher.accumulate():
            pass
    F.cross_entropy(model(x), t).backward()  # hooks are gone: nothing is recorded
    assert fisher.samples == 0 and all(v.abs().sum() == 0 for v in fisher._buffers.values())


def test_channels_last_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 16, 3))
    model = randomise(model.double()).eval()
    x, t = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    want = fisher_of(model, x, t)
    model = model.to(memory_format=torch.channels_last)
    got = fisher_of(model, x.to(memory_format=torch.channels_last), t)
    for name in want:
        assert_fisher_close(got[name], want[name], 1e-10)


def test_matches_backpack_sum_grad_squared():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(36, 10), nn.Sigmoid(), nn.Linear(10, 3)).double()
    x, t = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = fisher_of(model, x, t)
    ext_model = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))(ext_model(x), t)
    with backpack.backpack(SumGradSquared()):
        loss.backward()
    for name, p in model.named_parameters():
        assert_fisher_close(got[name] * 7, p.sum_grad_squared, 1e-10)


def profiled_peak(prof) -> int:
    """Peak live bytes of a profiled region (allocations minus frees, in time order)."""
    steps, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocation and free with its time (a private but stable profiler API)
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            steps.append((e.start_time_ns, e.typed[1].alloc_size))
        stack.extend(e.children)
    live = top = 0
    for _, delta in sorted(steps):
        live += delta
        top = max(top, live)
    return top


@pytest.mark.parametrize("params", ["norm", "all"])
def test_extra_memory_does_not_grow_with_batch(params, monkeypatch):
    """Peak bytes allocated by the Fisher hooks (c10 CPU allocations, from the profiler) at batch 8 and 64."""
    monkeypatch.setattr(df, "WORKSPACE_BYTES", 512)  # both batches run in workspace-bounded chunks
    model, shape = make_model("cnn_bn")
    model = model.train()

    worst = 0

    def measured(original):
        def hook(self, *args):
            nonlocal worst
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
                original(self, *args)
            worst = max(worst, profiled_peak(prof))
        return hook

    monkeypatch.setattr(DiagFisher, "_on_forward", measured(DiagFisher._on_forward))
    monkeypatch.setattr(DiagFisher, "_on_grad", measured(DiagFisher._on_grad))

    def peak(batch):
        nonlocal worst
        worst = 0
        x, t = torch.randn(batch, *shape), torch.randint(0, 3, (batch,))
        fisher = DiagFisher(model, params)
        with fisher.accumulate():
            fisher.backward(F.cross_entropy(model(x), t, reduction="none"))
        fisher.detach()
        return worst

    p_bytes = sum(p.numel() for p in model.parameters()) * 4
    small, large = peak(8), peak(64)
    assert small > 0
    # what may grow with N: GroupNorm's per-(sample, group) mean/var/invstd (autograd keeps the same)
    per_sample_stats = sum(4 * m.num_groups * 4 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert large <= small + (64 - 8) * per_sample_stats + 1024, (small, large)
    assert large <= 4 * p_bytes + df.WORKSPACE_BYTES + 4096, (large, p_bytes)


# --------------------------------------------------------------------------- bad input
def test_unsupported_layer_asked_for_explicitly():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"no per-sample Fisher for 0.weight \(Conv1d\).*supported layers"):
        DiagFisher(model, ["0.weight", "2.weight"])
    DiagFisher(model, ["2.weight"])  # leaving it out works
    att = nn.MultiheadAttention(4, 2)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        DiagFisher(att)


def test_params_not_in_model():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no parameter named 'weights'"):
        DiagFisher(model, ["weights"])
    with pytest.raises(ValueError, match=r"shape \(2, 3\) is not in the model"):
        DiagFisher(model, [nn.Linear(3, 2).weight])
    with pytest.raises(ValueError, match="params='bn'"):
        DiagFisher(model, "bn")
    with pytest.raises(ValueError, match="no parameters selected"):
        DiagFisher(model, lambda name, p: False)


def test_non_sum_losses_are_rejected():
    model = nn.Linear(4, 3)
    x, t = torch.randn(5, 4), torch.randint(0, 3, (5,))
    fisher = DiagFisher(model)
    with fisher.accumulate():
        with pytest.raises(ValueError, match="last op MseLossBackward0"):
            fisher.backward(F.mse_loss(model(x), torch.randn(5, 3)))
        with pytest.raises(ValueError, match="last op MaxBackward1"):
            fisher.backward(F.cross_entropy(model(x), t, reduction="none").max())
        with pytest.raises(ValueError, match="looks like a mean over the batch but accumulate.. was told "
                                             "reduction='sum'"):
            fisher.backward(F.cross_entropy(model(x), t))
        with pytest.raises(ValueError, match=r"per-sample losses of shape \(5,\)"):
            fisher.backward(F.cross_entropy(model(x), t, reduction="none")[:4])
        with pytest.raises(ValueError, match="last op NllLossBackward0"):
            fisher.backward(F.cross_entropy(model(x), t, weight=torch.rand(3)))  # weighted mean
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        with fisher.accumulate(reduction="none"):
            pass
    with pytest.raises(RuntimeError, match="inside `with fisher.accumulate"):
        fisher.backward(F.cross_entropy(model(x), t, reduction="none"))


def test_shared_and_reused_layers():
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shared by 2 layers"):
        DiagFisher(nn.Sequential(shared, nn.ReLU(), shared))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared by 2 layers"):
        DiagFisher(tied)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    fisher = DiagFisher(model)
    with fisher.accumulate(), pytest.raises(RuntimeError, match="ran twice in one pass"):
        model(torch.randn(2, 3))


def test_forward_without_grad_path_and_batch_mismatch():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    fisher = DiagFisher(model, ["0.weight", "1.weight"])
    with fisher.accumulate(), pytest.raises(RuntimeError, match="does not require grad"):
        model(torch.randn(2, 3))

    class Reshaper(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x).reshape(-1, 8))

    model = Reshaper()
    fisher = DiagFisher(model)
    with fisher.accumulate(), pytest.raises(RuntimeError, match="sees 2 samples but this pass started with 4"):
        model(torch.randn(4, 4))


def test_second_gradient_through_one_forward_is_refused():
    """A second backward, or an autograd.grad besides the backward, used to add the Fisher twice."""
    torch.manual_seed(0)
    model, shape = make_model("cnn_bn")
    model = randomise(model.double()).eval()
    x, t = torch.randn(4, *shape, dtype=torch.float64), torch.randint(0, 3, (4,))
    once = fisher_of(model, x, t)
    fisher = DiagFisher(model)
    with fisher.accumulate():
        loss = F.cross_entropy(model(x), t, reduction="sum")
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="a second gradient reached .* from one forward pass"):
            loss.backward()
    assert fisher.samples == 4
    for name, value in fisher.result().items():  # the refused pass added nothing
        assert_fisher_close(value, once[name], 1e-12)
    fisher = DiagFisher(model)
    with fisher.accumulate():
        xg = x.clone().requires_grad_()
        loss = F.cross_entropy(model(xg), t, reduction="sum")
        torch.autograd.grad(loss, xg, retain_graph=True)  # e.g. an input gradient for an adversarial step
        with pytest.raises(RuntimeError, match="a second gradient reached"):
            loss.backward()
    # two forwards, each backpropagated once, are two batches
    fisher = DiagFisher(model)
    with fisher.accumulate():
        for _ in range(2):
            fisher.backward(F.cross_entropy(model(x), t, reduction="none"))
    for name, value in fisher.result().items():
        assert_fisher_close(value, once[name], 1e-12)


def test_conv_with_impossible_geometry_is_refused():
    """stride=0 used to end in a ZeroDivisionError in the op's shape check (torch's forward refuses it too)."""
    with pytest.raises(ValueError, match=r"DiagFisher: Conv2d '1': stride must be two ints >= 1, got \(0, 1\)"):
        DiagFisher(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(3, 4, 3, stride=(0, 1))))
    with pytest.raises(ValueError, match=r"Conv2d 'Conv2d': dilation must be two ints >= 1, got \(1, 0\)"):
        DiagFisher(nn.Conv2d(3, 4, 3, dilation=(1, 0)))
    dy, x = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 6, 6)
    for kwargs, name in [(dict(stride=0), "stride"), (dict(padding=-1), "padding"), (dict(dilation=0), "dilation")]:
        least = 0 if name == "padding" else 1
        with pytest.raises(ValueError, match=f"diag_fisher_conv2d: {name} must be two ints >= {least}"):
            diag_fisher_conv2d(dy, x, 3, **kwargs)
    with pytest.raises(ValueError, match="kernel_size must be two ints >= 1"):
        diag_fisher_conv2d(dy, x, 0)
    DiagFisher(nn.Conv2d(3, 4, 3, padding="same"))  # string padding is the module's own business


def test_batchnorm_memory_layouts_agree_to_rounding():
    """What the README claims: bit-identical across thread counts in each layout, NCHW vs channels-last to rounding."""
    bn = nn.BatchNorm2d(16).train()
    x, dy = torch.randn(32, 16, 9, 9) * 2 + 1, torch.randn(32, 16, 9, 9)

    def fisher(layout):
        xs, dys = (x, dy) if layout == "nchw" else (x.to(memory_format=torch.channels_last),
                                                    dy.to(memory_format=torch.channels_last))
        view, (mean, invstd) = df._norm_views(bn, xs, True)
        with use_backend("cpp"):
            return diag_fisher_norm(view(dys), view(xs), mean, invstd)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 3):
            torch.set_num_threads(n)
            results[n] = {layout: fisher(layout) for layout in ("nchw", "channels_last")}
    finally:
        torch.set_num_threads(threads)
    for layout in ("nchw", "channels_last"):
        assert all(torch.equal(a, b) for a, b in zip(results[1][layout], results[3][layout]))
    oracle = norm_oracle(dy.double().reshape(32, 1, 16, 81), x.double().reshape(32, 1, 16, 81),
                         *[s.double() for s in df._norm_views(bn, x.double(), True)[1]])
    for layout in ("nchw", "channels_last"):
        for got, want in zip(results[1][layout], oracle):
            assert_fisher_close(got, want, 1e-5)
    for a, b in zip(results[1]["channels_last"], results[1]["nchw"]):
        assert_fisher_close(a, b, 1e-5)


def test_layer_that_never_runs_warns():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    fisher = DiagFisher(model)
    with pytest.warns(UserWarning, match="never ran as modules.*unused"):
        with fisher.accumulate():
            fisher.backward(model["used"](torch.randn(4, 3)).sum(1))


def test_op_bad_input():
    dy, x, mean, invstd = norm_inputs((3, 2, 6, 5, (1, 1, 6)), torch.float32)
    with pytest.raises(ValueError, match=r"both be \(N, A, P, B\)"):
        diag_fisher_norm(dy[0], x[0], mean, invstd)
    with pytest.raises(TypeError, match="must be torch.float32 for torch.float32 inputs"):
        diag_fisher_norm(dy, x, mean.double(), invstd.double())
    with pytest.raises(ValueError, match="do not fit input"):
        diag_fisher_norm(dy, x, mean[:, :, :4], invstd[:, :, :4])
    with pytest.raises(TypeError, match="share a floating dtype"):
        diag_fisher_linear(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same leading dims"):
        diag_fisher_linear(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="gives"):
        diag_fisher_conv2d(torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5), 3)
    with pytest.raises(ValueError, match="groups do not divide"):
        diag_fisher_conv2d(torch.randn(2, 4, 3, 3), torch.randn(2, 3, 5, 5), 3, groups=2)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda does not run cpu tensors"):
        diag_fisher_norm(dy, x, mean, invstd)


def test_empty_batch():
    fw, fb = diag_fisher_norm(torch.randn(0, 1, 4, 3), torch.randn(0, 1, 4, 3), torch.zeros(1, 1, 4),
                              torch.ones(1, 1, 4))
    assert fw.tolist() == [0.0] * 4 and fb.tolist() == [0.0] * 4
    fw, fb = diag_fisher_linear(torch.randn(0, 2), torch.randn(0, 3))
    assert fw.shape == (2, 3) and fw.abs().sum() == 0


class CastLayerNorm(nn.LayerNorm):
    """timm's habit: a LayerNorm subclass whose own forward computes the base LayerNorm."""

    def forward(self, x):
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


def test_layernorm_subclass_checked_against_the_base_forward():
    torch.manual_seed(0)
    model = randomise(nn.Sequential(nn.Linear(5, 6), CastLayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).double())
    x, t = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    got = fisher_of(model, x, t)
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_sample = vmap(grad(lambda p, xi, ti: F.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])),
                      in_dims=(None, 0, 0))(params, x, t)
    for name, g in per_sample.items():
        assert_fisher_close(got[name], g.square().mean(0), 1e-10)
    model[1] = ScaledLayerNorm(6).double()
    with pytest.raises(ValueError, match="ScaledLayerNorm 1.bias/1.weight overrides forward and does not compute LayerNorm"):
        fisher_of(model, x, t)
