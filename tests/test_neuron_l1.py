"""neuron_l1_change against its float64 reference, and TSBD's select_and_zero on hand-built cases."""
import copy
import random

import pytest
import torch
from torch import nn

from pydefend.backends import BackendUnavailable, use_backend
from pydefend.ops import neuron_l1 as nl1
from pydefend.ops.neuron_l1 import ZeroRecord, neuron_l1_change, neuron_l1_change_reference, select_and_zero

CPU_BACKENDS = ["cpp", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Every input dtype accumulates in fp32 (fp64 for float64) on the already-rounded values, so the tolerance is
# the accumulation error of the longest row (10^6 terms) plus the fp32 rounding of the output.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 2e-7}

# (rows, trailing...) shapes around the kernels' plan boundaries: rows of 1, 32/33 (thread vs warp rows),
# 16384/16385 (one piece vs two), 10^6 (61 pieces), primes, 0-d, empty tensors, conv and linear weights.
EDGE_SHAPES = [(), (1,), (7,), (5, 1), (3, 32), (3, 33), (2, 16384), (2, 16385), (1, 10**6), (64, 3, 3, 3),
               (13, 7, 5), (0, 4), (4, 0), (17, 9, 1, 1), (10, 577)]


def random_shape(rng: random.Random, max_numel: int):
    kind = rng.choice(["0d", "1d", "2d", "4d"])
    if kind == "0d":
        return ()
    if kind == "1d":
        return (rng.randint(1, 3000),)
    if kind == "2d":
        rows = rng.randint(1, 200)
        return (rows, rng.randint(1, max(1, max_numel // rows)))
    o, i, k = rng.randint(1, 64), rng.randint(1, 64), rng.choice([1, 3, 5])
    return (o, i, k, k)


def make_pair(shape, dtype, layout="contiguous"):
    a = torch.randn(shape, dtype=torch.float64) * 2
    b = a + torch.randn(shape, dtype=torch.float64) * torch.rand(()).item()
    if layout == "strided" and len(shape) >= 1:  # a non-dense view: every other column (or element)
        wide = tuple(shape[:-1]) + (shape[-1] * 2,)
        a = torch.randn(wide, dtype=torch.float64)[..., ::2]
        b = torch.randn(wide, dtype=torch.float64)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        a = torch.randn(tuple(reversed(shape)), dtype=torch.float64).transpose(0, -1)
        b = torch.randn(tuple(reversed(shape)), dtype=torch.float64).transpose(0, -1)
    return a.to(dtype), b.to(dtype)


def random_lists(count, seed, max_numel=20000, layouts=("contiguous",)):
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(count):
        x, y = make_pair(random_shape(rng, max_numel), rng.choice(DTYPES), rng.choice(layouts))
        a.append(x)
        b.append(y)
    return a, b


def assert_matches_reference(out, a, b):
    ref = neuron_l1_change_reference(a, b)
    assert len(out) == len(a)
    for o, r, x in zip(out, ref, a):
        assert o.dtype == torch.float32 and o.shape == r.shape == (1 if x.dim() == 0 else x.shape[0],)
        torch.testing.assert_close(o.double(), r, rtol=RTOL[x.dtype], atol=1e-30)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_shapes_match_reference(backend, dtype):
    pairs = [make_pair(s, dtype) for s in EDGE_SHAPES]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    with use_backend(backend):
        assert_matches_reference(neuron_l1_change(a, b), a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("count", [1, 2, 37, 300])
def test_random_mixed_lists_match_reference(backend, count):
    a, b = random_lists(count, torch.initial_seed() + count, max_numel=400_000 // count,
                        layouts=("contiguous", "strided", "transposed"))
    with use_backend(backend):
        assert_matches_reference(neuron_l1_change(a, b), a, b)


def test_long_rows_with_nan_and_inf():
    a = torch.randn(3, 40000)
    b = a.clone()
    a[0, 20000] = float("nan")
    a[1, 39999] = float("inf")
    b[2, 5] += 1.5
    for backend in CPU_BACKENDS:
        with use_backend(backend):
            out, = neuron_l1_change([a], [b])
        assert out[0].isnan() and out[1].isinf() and out[2].item() == pytest.approx(1.5, rel=1e-6)


def test_outputs_are_fresh_and_never_require_grad():
    a = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]
    b = [torch.randn(4, 3), torch.randn(4)]
    out = neuron_l1_change(a, b)
    assert not any(o.requires_grad for o in out)
    assert out[0].untyped_storage().data_ptr() != out[1].untyped_storage().data_ptr()


def test_bit_identical_across_repeats_and_thread_counts():
    a, b = random_lists(40, torch.initial_seed(), max_numel=50_000)
    a.append(torch.randn(2, 300_000))
    b.append(torch.randn(2, 300_000))
    first = neuron_l1_change(a, b)
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            again = neuron_l1_change(a, b)
            assert all(torch.equal(x, y) for x, y in zip(first, again))
    finally:
        torch.set_num_threads(threads)


def test_opcheck():
    a, b = random_lists(6, torch.initial_seed(), max_numel=3000)
    torch.library.opcheck(torch.ops.pydefend.neuron_l1_change.default, (a, b))


def test_compile_fullgraph(inductor_vector_isa):
    a, b = random_lists(5, torch.initial_seed(), max_numel=3000)
    a = [x.float() for x in a]
    b = [y.float() for y in b]

    def f(xs, ys):
        return torch.cat([o * 2 for o in neuron_l1_change(xs, ys)])

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(a, b), f(a, b), atol=0, rtol=0)


def test_empty_list():
    assert neuron_l1_change([], []) == []


# --------------------------------------------------------------------------- bad input
def test_length_mismatch():
    with pytest.raises(ValueError, match="got 2 tensors in params_a but 1 in params_b"):
        neuron_l1_change([torch.randn(2), torch.randn(2)], [torch.randn(2)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shape_dtype_and_int_mismatch(backend):
    with use_backend(backend):
        with pytest.raises((ValueError, RuntimeError), match=r"pair 1 has shapes \(?\[?3, 4"):
            neuron_l1_change([torch.randn(2), torch.randn(3, 4)], [torch.randn(2), torch.randn(3, 5)])
        with pytest.raises((TypeError, RuntimeError), match="pair 0 has dtypes"):
            neuron_l1_change([torch.randn(2)], [torch.randn(2, dtype=torch.float16)])
        with pytest.raises((TypeError, RuntimeError), match="supported: float32"):
            neuron_l1_change([torch.ones(2, dtype=torch.int32)], [torch.ones(2, dtype=torch.int32)])


def test_different_devices():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        neuron_l1_change([torch.randn(2), torch.randn(3)], [torch.randn(2), torch.randn(3, device="meta")])


def test_forced_backend_that_cannot_run_says_why():
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda does not run cpu tensors"):
        neuron_l1_change([torch.randn(2)], [torch.randn(2)])


# --------------------------------------------------------------------------- select_and_zero
def two_layer_dicts():
    """Layer "c1": 2 neurons x 4 sub-weights, "c2": 3 neurons x 2. The backdoored weights are all 10 (so a
    zero is visible), the unlearned ones differ by the |ΔW| below. NWC: c1 = [10, 1], c2 = [6, 0.5, 7]."""
    delta = {"c1": torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.25, 0.25, 0.25, 0.25]]),
             "c2": torch.tensor([[5.0, 1.0], [0.25, 0.25], [3.5, 3.5]])}
    bd = {k: torch.full_like(v, 10.0) for k, v in delta.items()}
    ul = {k: bd[k] - v * (1 if k == "c1" else -1) for k, v in delta.items()}
    return bd, ul


def zero_mask(weights):
    return {k: (v == 0).int().tolist() for k, v in weights.items()}


def test_global_mode_known_answer():
    bd, ul = two_layer_dicts()
    ul_before = copy.deepcopy(ul)
    # 5 neurons, n = 0.6 -> 3: c1[0] (10), c2[2] (7), c2[0] (6); their pooled 4 + 2 + 2 = 8 sub-weights,
    # m = 0.5 -> the 4 largest: 5.0 (c2[0,0]), 4.0 (c1[0,0]), 3.5 and 3.5 (c2[2,:])
    records = select_and_zero(bd, ul, n=0.6, m=0.5, mode="global")
    assert records == [ZeroRecord("c1", 0, 10.0, 1), ZeroRecord("c2", 2, 7.0, 2), ZeroRecord("c2", 0, 6.0, 1)]
    assert zero_mask(bd) == {"c1": [[1, 0, 0, 0], [0, 0, 0, 0]], "c2": [[1, 0], [0, 0], [1, 1]]}
    assert all(torch.equal(ul[k], ul_before[k]) for k in ul), "the unlearned weights are never touched"


def test_per_neuron_mode_known_answer():
    bd, ul = two_layer_dicts()
    # same 3 neurons; m = 0.5 of each neuron's own sub-weights: 2 of c1[0], 1 of c2[2] (tie: lower index), 1 of c2[0]
    records = select_and_zero(bd, ul, n=0.6, m=0.5, mode="per_neuron")
    assert [(r.layer, r.neuron, r.zeroed) for r in records] == [("c1", 0, 2), ("c2", 2, 1), ("c2", 0, 1)]
    assert zero_mask(bd) == {"c1": [[1, 1, 0, 0], [0, 0, 0, 0]], "c2": [[1, 0], [0, 0], [1, 0]]}


def test_global_ties_are_zeroed_in_layer_neuron_index_order():
    bd, ul = two_layer_dicts()
    # all 5 neurons, 14 sub-weights, m = 0.5 -> 7: six values above 1.0 (5, 4, 3.5, 3.5, 3, 2), then one of
    # the two 1.0 ties (c1[0,3], c2[0,1]): the first in (layer, neuron, index) order, c1[0,3]
    records = select_and_zero(bd, ul, n=1.0, m=0.5, mode="global")
    assert zero_mask(bd) == {"c1": [[1, 1, 1, 1], [0, 0, 0, 0]], "c2": [[1, 0], [0, 0], [1, 1]]}
    assert sum(r.zeroed for r in records) == 7


def test_nwc_ties_rank_by_layer_then_index():
    bd = {"a": torch.ones(3, 2), "b": torch.ones(2, 2)}
    ul = {"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)}  # every NWC is 2
    records = select_and_zero(bd, ul, n=0.6, m=1.0)
    assert [(r.layer, r.neuron) for r in records] == [("a", 0), ("a", 1), ("a", 2)]
    assert bd["a"].eq(0).all() and bd["b"].eq(1).all()


def test_n_and_m_at_the_ends():
    bd, ul = two_layer_dicts()
    assert select_and_zero(bd, ul, n=0.0) == [] and all(v.eq(10).all() for v in bd.values())
    records = select_and_zero(bd, ul, n=1.0, m=0.0)
    assert len(records) == 5 and all(r.zeroed == 0 for r in records) and all(v.eq(10).all() for v in bd.values())
    for mode in ("global", "per_neuron"):
        bd, ul = two_layer_dicts()
        records = select_and_zero(bd, ul, n=1.0, m=1.0, mode=mode)
        assert sum(r.zeroed for r in records) == 14 and all(v.eq(0).all() for v in bd.values())


def make_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, bias=False),
                         nn.Flatten(), nn.Linear(12 * 4, 10))


def test_layers_filtered_by_type_and_paired_by_module():
    bd, ul = make_net(0), make_net(1)
    linear_before = bd[5].weight.detach().clone()
    records = select_and_zero(bd, ul, n=0.5, m=0.7)
    assert {r.layer for r in records} <= {"0", "3"} and len(records) == 10  # 20 conv neurons
    assert torch.equal(bd[5].weight, linear_before) and bd[1].weight.ne(0).all()
    records = select_and_zero(make_net(0), ul, n=0.5, m=0.7, layer_types=(nn.Conv2d, nn.Linear))
    assert len(records) == 15  # 30 neurons
    # pairing is by module position: a wrapped copy of the same architecture pairs fine
    wrapped = nn.Sequential(make_net(1))
    assert select_and_zero(make_net(0), wrapped, n=0.5) == select_and_zero(make_net(0), make_net(1), n=0.5)


def brute_force(bd: dict, ul: dict, n, m, mode):
    """Whole-model dense version of the documented rule (materialises every |ΔW|)."""
    names = list(bd)
    nwc = torch.cat(neuron_l1_change([bd[k] for k in names], [ul[k] for k in names]))
    sizes = [bd[k].shape[0] for k in names]
    starts = [sum(sizes[:i]) for i in range(len(names))]
    order = torch.sort(nwc, descending=True, stable=True).indices[:nl1._count(n, nwc.numel())]
    chosen = {k: sorted(int(g) - starts[i] for g in order if starts[i] <= g < starts[i] + sizes[i])
              for i, k in enumerate(names)}
    diffs = {k: (bd[k].float() - ul[k].float()).abs().reshape(bd[k].shape[0], -1) for k in names}
    masks = {k: torch.zeros_like(diffs[k], dtype=torch.bool) for k in names}
    if mode == "per_neuron":
        for k in names:
            j = nl1._count(m, diffs[k].shape[1])
            for r in chosen[k]:
                masks[k][r, torch.sort(diffs[k][r], descending=True, stable=True).indices[:j]] = True
    else:
        pooled = torch.cat([diffs[k][r] for k in names for r in chosen[k]]) if order.numel() else torch.zeros(0)
        top = torch.sort(pooled, descending=True, stable=True).indices[:nl1._count(m, pooled.numel())]
        flat = torch.zeros(pooled.numel(), dtype=torch.bool)
        flat[top] = True
        i = 0
        for k in names:
            for r in chosen[k]:
                masks[k][r] = flat[i:i + diffs[k].shape[1]]
                i += diffs[k].shape[1]
    return {k: masks[k].view(bd[k].shape) for k in names}


@pytest.mark.parametrize("mode", ["global", "per_neuron"])
@pytest.mark.parametrize("quantised", [False, True])
def test_matches_brute_force(mode, quantised):
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (8, 32, 1, 1), "fc": (10, 200)}
    bd = {k: torch.randn(s) for k, s in shapes.items()}
    ul = {k: v + torch.randn(v.shape) * 0.1 for k, v in bd.items()}
    if quantised:  # many exactly equal |ΔW| and NWC values: exercises every tie rule
        ul = {k: bd[k] + torch.randint(-3, 4, bd[k].shape).float() / 4 for k in bd}
    bd["fc"] = bd["fc"].to(torch.bfloat16)  # a mixed-dtype model
    ul["fc"] = ul["fc"].to(torch.bfloat16)
    n, m = random.Random(torch.initial_seed()).choice([(0.15, 0.7), (0.33, 0.41), (0.9, 0.05)])
    expected = brute_force(bd, ul, n, m, mode)
    work = {k: v.clone() for k, v in bd.items()}
    records = select_and_zero(work, ul, n=n, m=m, mode=mode)
    for k in bd:
        zeroed = torch.where(expected[k], torch.zeros_like(bd[k]), bd[k])
        assert torch.equal(work[k], zeroed), k
    assert sum(r.zeroed for r in records) == sum(int(v.sum()) for v in expected.values())


def zeroed_by(before: dict, after: dict) -> int:
    return sum(int(((after[k] == 0) & (before[k] != 0)).sum()) for k in before)


@pytest.mark.parametrize("mode", ["global", "per_neuron"])
def test_ties_records_match_the_zeroing_exactly(mode):
    """Every |ΔW| equal, over layers of several row blocks: exactly round(m·count) sub-weights are zeroed, in
    (layer, neuron, index) order, and the records count exactly those."""
    shapes = {"a": (3, 5), "b": (600, 1000), "c": (7, 16)}  # "b" spans three blocks of 2^18 elements
    bd = {k: torch.full(v, 2.0) for k, v in shapes.items()}
    ul = {k: v - 0.5 for k, v in bd.items()}
    work = {k: v.clone() for k, v in bd.items()}
    records = select_and_zero(work, ul, n=1.0, m=0.37, mode=mode)
    total = sum(v.numel() for v in bd.values())
    expected = nl1._count(0.37, total) if mode == "global" else sum(
        bd[k].shape[0] * nl1._count(0.37, bd[k].shape[1]) for k in bd)
    assert sum(r.zeroed for r in records) == zeroed_by(bd, work) == expected
    for r in records:
        assert int((work[r.layer][r.neuron] == 0).sum()) == r.zeroed
    if mode == "global":  # ties taken in (layer, neuron, index) order: a prefix of the flattened weights
        flat = torch.cat([work[k].reshape(-1) for k in shapes])
        assert flat[:expected].eq(0).all() and flat[expected:].eq(2).all()


@pytest.mark.parametrize("mode", ["global", "per_neuron"])
def test_layer_without_neurons_among_others(mode):
    """A 0-row layer used to raise IndexError (its weight[0] does not exist)."""
    bd = {"empty": torch.ones(0, 4), "a": torch.arange(1.0, 13.0).view(3, 4), "b": torch.ones(2, 3)}
    ul = {k: torch.zeros_like(v) for k, v in bd.items()}
    work = {k: v.clone() for k, v in bd.items()}
    records = select_and_zero(work, ul, n=1.0, m=0.5, mode=mode)
    assert [(r.layer, r.neuron) for r in records] == [("a", 2), ("a", 1), ("a", 0), ("b", 0), ("b", 1)]
    assert sum(r.zeroed for r in records) == zeroed_by(bd, work) == (9 if mode == "global" else 10)
    assert work["empty"].shape == (0, 4)


def test_tied_weights_are_refused():
    """Weights shared by two layers were zeroed through both names and counted twice (16 claimed, 8 zeroed)."""
    w, u = torch.randint(1, 5, (2, 8)).float(), torch.zeros(2, 8)
    for mode in ("global", "per_neuron"):
        with pytest.raises(ValueError, match=r"layers 'a' and 'b' share weight memory \(tied weights\)"):
            select_and_zero({"a": w, "b": w}, {"a": u, "b": u.clone()}, n=0.5, m=1.0, mode=mode)
    with pytest.raises(ValueError, match="share weight memory"):  # overlapping views of one buffer
        select_and_zero({"a": w[:, :5], "b": w[:, 4:]}, {"a": u[:, :5], "b": u[:, 4:]})
    with pytest.raises(ValueError, match="share weight memory"):  # a's unlearned weights are b's backdoored ones
        select_and_zero({"a": w, "b": u}, {"a": u, "b": w})
    net1, net2 = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)), nn.Sequential(nn.Conv2d(2, 2, 1),
                                                                                     nn.Conv2d(2, 2, 1))
    net1[1].weight = net1[0].weight
    with pytest.raises(ValueError, match="layers '0' and '1' share weight memory"):
        select_and_zero(net1, net2)
    # disjoint parts of one buffer (a flat parameter store), and a model compared with itself, are fine
    select_and_zero({"a": w[:1], "b": w[1:]}, {"a": u[:1], "b": u[1:]}, n=1.0, m=0.5)
    same = make_net(0)
    records = select_and_zero(same, same, n=0.5, m=0.5)
    assert len(records) == 10


def test_selection_bad_input():
    bd, ul = two_layer_dicts()
    with pytest.raises(ValueError, match="did you mean 0.15"):
        select_and_zero(bd, ul, n=15)
    with pytest.raises(ValueError, match="m is a fraction"):
        select_and_zero(bd, ul, m=-0.1)
    with pytest.raises(ValueError, match="mode must be"):
        select_and_zero(bd, ul, mode="per-layer")
    with pytest.raises(ValueError, match="differ in keys"):
        select_and_zero(bd, {"c1": ul["c1"]})
    with pytest.raises(ValueError, match="entry 'c2' has shapes"):
        select_and_zero(bd, {"c1": ul["c1"], "c2": torch.zeros(3, 3)})
    with pytest.raises(TypeError, match="two nn.Modules or two"):
        select_and_zero(make_net(0), bd)
    with pytest.raises(ValueError, match="has 2 chosen layers but the unlearned model has 1"):
        select_and_zero(make_net(0), nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="layer '3' is Conv2d"):
        select_and_zero(make_net(0), nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 3)))
    with pytest.raises(ValueError, match="transposed convolutions"):
        select_and_zero(make_net(0), make_net(1), layer_types=(nn.ConvTranspose2d,))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        select_and_zero({"c": torch.ones(2, 2)}, {"c": torch.ones(2, 2, device="meta")})


# --------------------------------------------------------------------------- memory of the selection step
def peak_cpu_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU allocator while fn() runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("mode", ["global", "per_neuron"])
def test_selection_memory_is_bounded_by_the_largest_layer(mode):
    # 12 conv layers of 2^20 fp32 weights (4 MiB each): the whole model's |ΔW| would be 48 MiB
    bd = {f"conv{i}": torch.randn(256, 256, 4, 4) for i in range(12)}
    ul = {k: v + torch.randn(v.shape) for k, v in bd.items()}
    largest = 256 * 256 * 16 * 4
    peak = peak_cpu_bytes(lambda: select_and_zero(bd, ul, n=0.5, m=0.7, mode=mode))
    assert peak <= 2 * largest, f"peak extra {peak / 2**20:.1f} MiB"
