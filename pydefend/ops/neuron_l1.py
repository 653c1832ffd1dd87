"""neuron_l1_change and TSBD's zero re-initialisation (TSBD eq. 1, §3.4, Alg. 1).

    neuron_l1_change(params_a, params_b)[j][k] = sum_i |A_j[k, i] - B_j[k, i]|

One fp32 tensor per pair, of shape (A_j.shape[0],): k runs over the output
neurons (dim 0) and i over every trailing element (a 1-D bias gives one
value per element, a 0-d tensor gives shape (1,)). Pairs may differ from each
other in shape and dtype (float32, float64, float16, bfloat16), but A_j and B_j
must match in shape and dtype, and every tensor must be on one device; anything
else is a clear error. Accumulation is fp32 (fp64 for float64 inputs), in an
order that depends on the shapes only: bit-identical run to run and for any
thread count. NaN/inf propagate into their neuron's sum. Empty rows give 0.

One call covers the whole list: one dispatch, one C++ parallel loop on CPU,
one CUDA launch over a per-tensor table on GPU (plus a tiny second pass when a
row is longer than 16,384 elements), and one Triton launch per (dtype, tile
class). `A - B` is never materialised. Non-contiguous inputs are copied to a
contiguous layout first. The op is not differentiable: outputs never require
grad (weight changes are measurements, not training signals).

select_and_zero(backdoored, unlearned, n, m, mode) ranks neurons of the chosen
layers (default: conv layers, as TSBD) globally by NWC, takes the top n, and
zeroes, in the backdoored weights, the sub-weights with the largest
|W_backdoored - W_unlearned| among them: the top m of the pooled selected
weights (mode="global", what TSBD's code and the paper's V3 do) or the top m
of each selected neuron's own weights (mode="per_neuron"). Peak extra memory
is bounded by one block of selected rows (about 2^18 elements, or one row), not by the
model: NWC comes from the fused op, and the global threshold is found by a
two-pass 16-bit radix select over |ΔW| recomputed block by block.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from .. import _library
from ..backends import Backend, select, why_not_native, why_not_triton

_library.load()

__all__ = ["neuron_l1_change", "neuron_l1_change_reference", "select_and_zero", "ZeroRecord", "CONV_TYPES",
           "BACKENDS"]

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _rows(t: torch.Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def _check_lists(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]):
    if len(a) != len(b):
        raise ValueError(f"neuron_l1_change: got {len(a)} tensors in params_a but {len(b)} in params_b")
    for j, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"neuron_l1_change: pair {j} has shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"neuron_l1_change: pair {j} has dtypes {x.dtype} and {y.dtype}")
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"neuron_l1_change: pair {j} has dtype {x.dtype}; supported: float32, float64, "
                            "float16, bfloat16")
        if x.device != a[0].device or y.device != a[0].device:
            raise ValueError(f"neuron_l1_change: pair {j} is on devices {x.device} and {y.device} but pair 0 is "
                             f"on {a[0].device} (all tensors must be on one device)")


# --------------------------------------------------------------------------- reference
def neuron_l1_change_reference(params_a, params_b) -> list[torch.Tensor]:
    """float64 definition of the op (the test oracle): materialises A - B one tensor at a time."""
    return [(x.double() - y.double()).abs().reshape(_rows(x), -1).sum(1) if x.numel()
            else torch.zeros(_rows(x), dtype=torch.float64, device=x.device)
            for x, y in zip(params_a, params_b)]


def _reference_forward(a, b):
    """The flat contract in plain PyTorch (the fallback backend): fp32 sums (fp64 for float64)."""
    out = []
    for x, y in zip(a, b):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.numel() == 0:
            out.append(torch.zeros(_rows(x), dtype=torch.float32, device=x.device))
            continue
        # contiguous first: the sum's order, hence its bits, then depends on the shape only
        out.append((x.contiguous().to(acc) - y.contiguous().to(acc)).abs().reshape(_rows(x), -1).sum(1)
                   .to(torch.float32))
    return out


# --------------------------------------------------------------------------- backends
def _native_forward(a, b):
    return torch.ops.pydefend_native.neuron_l1_change(a, b)


def _triton_forward(a, b):
    from ..kernels import neuron_l1 as k
    return k.neuron_l1_change([x.contiguous() for x in a], [y.contiguous() for y in b])


BACKENDS = {
    "cpp": Backend("cpp", _native_forward, None, ("cpu",), why_not_native),
    "cuda": Backend("cuda", _native_forward, None, ("cuda",), why_not_native),
    "triton": Backend("triton", _triton_forward, None, ("cuda", "cpu"), why_not_triton),
    "reference": Backend("reference", _reference_forward, None, ("cpu", "cuda", "mps", "xpu", "meta")),
}
_NATIVE = ("cpp", "cuda")


# --------------------------------------------------------------------------- op registration
_op = "pydefend::neuron_l1_change"


@torch.library.register_fake(_op)
def _fake(params_a, params_b):
    _check_lists(params_a, params_b)
    return [x.new_empty((_rows(x),), dtype=torch.float32) for x in params_a]


def _device(params_a, params_b):
    backend = select("neuron_l1_change", BACKENDS, params_a[0].device)
    if backend.name not in _NATIVE:  # the compiled kernels check their input in C++
        _check_lists(params_a, params_b)
    return backend.forward(params_a, params_b)


for _d in ("cpu", "cuda"):
    torch.library.register_kernel(_op, _d, _device)


# --------------------------------------------------------------------------- public API
def neuron_l1_change(params_a: Sequence[torch.Tensor], params_b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-output-neuron L1 change sum_i |A[k, i] - B[k, i]| for every pair (see the module docstring)."""
    params_a, params_b = list(params_a), list(params_b)
    if len(params_a) != len(params_b):
        raise ValueError(f"neuron_l1_change: got {len(params_a)} tensors in params_a but {len(params_b)} in "
                         "params_b")
    if not params_a:
        return []
    with torch.no_grad():
        return torch.ops.pydefend.neuron_l1_change(params_a, params_b)


# --------------------------------------------------------------------------- TSBD selection
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BLOCK_ELEMENTS = 1 << 18  # |ΔW| is recomputed in blocks of selected rows of about this many elements


@dataclass(frozen=True)
class ZeroRecord:
    """One selected neuron: its layer, its row in the weight (dim 0), its NWC and how many sub-weights were zeroed."""
    layer: str
    neuron: int
    nwc: float
    zeroed: int


def _count(fraction: float, total: int) -> int:
    """round(fraction * total), halves up, on the decimal value the caller wrote (0.7 * 5 -> 4, not 3)."""
    return int((Decimal(repr(float(fraction))) * total).to_integral_value(ROUND_HALF_UP))


def _check_fraction(name: str, value: float):
    if not 0.0 <= value <= 1.0:
        hint = f"; did you mean {value / 100:g}?" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"select_and_zero: {name} is a fraction in [0, 1], got {value}{hint}")


def _layer_pairs(backdoored, unlearned, layer_types) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, backdoored weight, unlearned weight) per chosen layer, paired by module position, not by name."""
    if isinstance(backdoored, nn.Module) != isinstance(unlearned, nn.Module):
        raise TypeError("select_and_zero: pass two nn.Modules or two name -> tensor mappings")
    if isinstance(backdoored, nn.Module):
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        if any(issubclass(t, transposed) for t in layer_types):
            raise ValueError("select_and_zero: transposed convolutions keep output neurons on dim 1, not dim 0; "
                             "they are not supported")
        bd = [(name, mod) for name, mod in backdoored.named_modules()
              if isinstance(mod, layer_types) and getattr(mod, "weight", None) is not None]
        ul = [mod for _, mod in unlearned.named_modules()
              if isinstance(mod, layer_types) and getattr(mod, "weight", None) is not None]
        if len(bd) != len(ul):
            raise ValueError(f"select_and_zero: the backdoored model has {len(bd)} chosen layers but the unlearned "
                             f"model has {len(ul)}")
        pairs = []
        for (name, mb), mu in zip(bd, ul):
            if type(mb) is not type(mu) or mb.weight.shape != mu.weight.shape:
                raise ValueError(f"select_and_zero: layer {name!r} is {type(mb).__name__}"
                                 f"{tuple(mb.weight.shape)} in the backdoored model but {type(mu).__name__}"
                                 f"{tuple(mu.weight.shape)} in the unlearned one")
            pairs.append((name, mb.weight, mu.weight))
        return pairs
    if not isinstance(backdoored, Mapping) or not isinstance(unlearned, Mapping):
        raise TypeError("select_and_zero: pass two nn.Modules or two name -> tensor mappings")
    if set(backdoored) != set(unlearned):
        missing = sorted(set(backdoored) ^ set(unlearned))
        raise ValueError(f"select_and_zero: the two mappings differ in keys {missing[:5]}")
    pairs = [(name, backdoored[name], unlearned[name]) for name in backdoored]
    for name, a, b in pairs:
        if a.dim() == 0 or a.shape != b.shape:
            raise ValueError(f"select_and_zero: entry {name!r} has shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             "both need the same shape with a neuron dimension (dim 0)")
    return pairs


def _cols(t: torch.Tensor) -> int:
    """Sub-weights per neuron (also for a layer without neurons, whose t[0] does not exist)."""
    return math.prod(t.shape[1:])


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes between t's first and last element (interleaved views of one buffer count as overlapping)."""
    start = t.data_ptr()
    return start, start + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _check_not_shared(pairs):
    """Zeroing one layer must change no other layer's weights or |ΔW|, or the threshold, the zeroing and the
    records would disagree (tied weights were zeroed through both names and counted twice)."""
    groups: dict = {}
    for i, (_, a, b) in enumerate(pairs):
        for t, zeroed in ((a, True), (b, False)):
            if t.numel() and t.device.type != "meta":
                groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((i, zeroed, _byte_span(t)))
    for group in groups.values():
        for (i, zi, (s0, e0)), (j, zj, (s1, e1)) in itertools.combinations(group, 2):
            if i != j and (zi or zj) and s0 < e1 and s1 < e0:
                raise ValueError(f"select_and_zero: layers {pairs[i][0]!r} and {pairs[j][0]!r} share weight memory "
                                 f"(tied weights), so zeroing one changes the other; leave one of them out (pass "
                                 f"name -> weight mappings)")


def _row_blocks(rows: torch.Tensor, cols: int):
    per = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for i in range(0, rows.numel(), per):
        yield rows[i:i + per]


def _abs_diff_keys(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """|a - b| of the given rows as fp32, (len(rows), cols); its int32 view orders like the values (all >= 0),
    every NaN made the one positive quiet NaN, so that NaNs tie above +inf whatever their payload."""
    acc = torch.promote_types(a.dtype, torch.float32)
    diff = (a.index_select(0, rows).to(acc) - b.index_select(0, rows).to(acc)).abs_().to(torch.float32)
    return diff.masked_fill_(diff.isnan(), float("nan")).reshape(rows.numel(), -1)


def _zero_rows(weight: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor):
    block = weight.index_select(0, rows)
    block.masked_fill_(mask.view(block.shape), 0)
    weight.index_copy_(0, rows, block)


def _top_threshold(pairs, selected, j: int) -> tuple[int, int]:
    """Key t of the j-th largest |ΔW| over the selected rows and how many keys equal to t are among the top j."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    prefix = None
    for shift in (16, 0):
        hist.zero_()
        for (_, a, b), rows in zip(pairs, selected):
            for block in _row_blocks(rows, _cols(a)):
                keys = _abs_diff_keys(a, b, block.to(a.device)).view(torch.int32).reshape(-1)
                if prefix is not None:
                    keys = keys[(keys >> 16) == prefix]
                hist += torch.bincount((keys >> shift) & 0xFFFF, minlength=1 << 16).cpu()  # int32: no int64 copy
        above = torch.flip(torch.cumsum(torch.flip(hist, (0,)), 0), (0,))  # above[v] = count of digits >= v
        digit = int(torch.nonzero(above >= j).max())
        j -= int(above[digit + 1]) if digit + 1 < hist.numel() else 0
        prefix = digit if prefix is None else (prefix << 16) | digit
    return prefix, j


def select_and_zero(backdoored: Union[nn.Module, Mapping[str, torch.Tensor]],
                    unlearned: Union[nn.Module, Mapping[str, torch.Tensor]],
                    n: float = 0.15, m: float = 0.70, mode: str = "global",
                    layer_types: tuple = CONV_TYPES) -> list[ZeroRecord]:
    """TSBD's NWC-based zero re-initialisation, in place on `backdoored`. Returns one record per selected neuron.

    backdoored, unlearned: two models of the same architecture (layers of `layer_types` are paired by their
        position in named_modules(); their `.weight` is used, biases are not), or two name -> weight mappings
        with the same keys (every entry is used).
    n: fraction of the chosen layers' neurons (globally, by NWC) to select; m: fraction of sub-weights to zero.
        Counts are round(n * neurons) and round(m * weights), halves up.
    mode: "global" zeroes the m-largest |ΔW| among all selected neurons' pooled sub-weights; "per_neuron"
        zeroes round(m * fan_in) sub-weights in every selected neuron.
    Ties: neurons with equal NWC rank by layer order, then index; equal |ΔW| in the global mode are zeroed in
        (layer, neuron, sub-weight index) order, and per neuron by index. NaN counts as the largest change.
    Records come in NWC rank order (largest first); `zeroed` is the number of that neuron's sub-weights set to 0
        (exactly the zeroing done; it may be 0 for a selected neuron in the global mode). Layers without neurons
        are allowed; layers sharing weight memory (tied weights) are refused.
    """
    _check_fraction("n", n)
    _check_fraction("m", m)
    if mode not in ("global", "per_neuron"):
        raise ValueError(f"select_and_zero: mode must be 'global' or 'per_neuron', got {mode!r}")
    layer_types = tuple(layer_types) if isinstance(layer_types, (tuple, list)) else (layer_types,)
    pairs = _layer_pairs(backdoored, unlearned, layer_types)
    if not pairs:
        return []
    _check_not_shared(pairs)
    nwc = torch.cat(neuron_l1_change([a for _, a, _ in pairs], [b for _, _, b in pairs]))
    k = _count(n, nwc.numel())
    if k == 0:
        return []
    order = torch.sort(nwc, descending=True, stable=True).indices[:k].cpu()
    bounds = torch.tensor([0] + [_rows(a) for _, a, _ in pairs]).cumsum(0)
    layer_of = torch.searchsorted(bounds, order, right=True) - 1
    selected = [torch.sort(order[layer_of == i]).values - int(bounds[i]) for i in range(len(pairs))]
    zeroed = [torch.zeros(_rows(a), dtype=torch.int64) for _, a, _ in pairs]

    with torch.no_grad():
        if mode == "per_neuron":
            for i, ((_, a, b), rows) in enumerate(zip(pairs, selected)):
                cols = _cols(a)
                j = _count(m, cols)
                if j == 0 or rows.numel() == 0:
                    continue
                for block in _row_blocks(rows, cols):
                    dev_rows = block.to(a.device)
                    diff = _abs_diff_keys(a, b, dev_rows)
                    top = torch.sort(diff, dim=1, descending=True, stable=True).indices[:, :j]
                    del diff
                    mask = torch.zeros(top.shape[0], cols, dtype=torch.bool, device=a.device).scatter_(1, top, True)
                    _zero_rows(a, dev_rows, mask)
                    zeroed[i][block] = j
        else:
            total = sum(rows.numel() * _cols(a) for (_, a, _), rows in zip(pairs, selected))
            j = _count(m, total)
            if j > 0:
                threshold, ties = _top_threshold(pairs, selected, j)
                for i, ((_, a, b), rows) in enumerate(zip(pairs, selected)):
                    for block in _row_blocks(rows, _cols(a)):
                        dev_rows = block.to(a.device)
                        keys = _abs_diff_keys(a, b, dev_rows).view(torch.int32)
                        mask = keys > threshold
                        if ties > 0:  # the first `ties` keys equal to the threshold, in row-major order
                            equal = keys == threshold
                            taken = equal & (torch.cumsum(equal.reshape(-1), 0) <= ties).view(equal.shape)
                            ties -= int(taken.sum())
                            mask |= taken
                        del keys
                        _zero_rows(a, dev_rows, mask)
                        zeroed[i][block] = mask.sum(1).cpu()
    names = [name for name, _, _ in pairs]
    records = []
    for g, layer in zip(order.tolist(), layer_of.tolist()):
        row = g - int(bounds[layer])
        records.append(ZeroRecord(names[layer], row, float(nwc[g]), int(zeroed[layer][row])))
    return records
