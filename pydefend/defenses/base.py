"""The common shape of a defense: model + the defender's clean data + config in,
repaired model + report out."""
from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass
class CleanData:
    """The defender's clean images (N, C, H, W) and labels: a split of *training* data, never the test set.

    Labels are int64, one per image, in [0, num_classes); num_classes is an integer >= 2.
    """
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if not _is_integer(self.num_classes) or self.num_classes < 2:
            raise ValueError(f"clean data needs num_classes, an integer >= 2, got {shown(self.num_classes)}")
        self.num_classes = int(self.num_classes)
        if not isinstance(self.x, torch.Tensor) or self.x.dim() < 1:
            raise ValueError(f"clean images must be a tensor (N, ...), got {shown(self.x)}")
        if not isinstance(self.y, torch.Tensor) or self.y.dtype != torch.int64 or self.y.dim() != 1:
            got = (f"a {self.y.dtype} tensor of shape {tuple(self.y.shape)}" if isinstance(self.y, torch.Tensor)
                   else shown(self.y))
            raise ValueError(f"clean labels must be a 1-D int64 tensor, got {got}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"clean data has {self.x.shape[0]} images but {self.y.shape[0]} labels")
        if self.x.shape[0] < 2:
            raise ValueError("a defense needs at least two clean samples")
        low, high = int(self.y.min()), int(self.y.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"clean labels must be in [0, {self.num_classes}) (num_classes={self.num_classes}), "
                             f"got labels from {low} to {high}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def split(self, second_fraction: float, seed: int) -> tuple["CleanData", "CleanData"]:
        """Seeded random split into (first, second) with round(n * second_fraction) samples in second."""
        n = len(self)
        n_second = min(n - 1, max(1, round(n * second_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        first, second = order[n_second:], order[:n_second]
        return (CleanData(self.x[first], self.y[first], self.num_classes),
                CleanData(self.x[second], self.y[second], self.num_classes))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple]:
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]

    def endless_batches(self, batch_size: int, seed: int) -> Iterator[tuple]:
        """Mini-batches forever, reshuffled (seeded) every pass."""
        epoch = 0
        while True:
            yield from self.batches(batch_size, shuffle=True, seed=seed + epoch)
            epoch += 1


@dataclass
class DefenseResult:
    model: nn.Module  # the repaired model, a plain nn.Module
    report: dict  # JSON-serialisable: config, phases, defense-specific details
    inserted: list = field(default_factory=list)  # how to rebuild inserted modules (see pydefend.repaired)
    plots: dict = field(default_factory=dict)  # file name -> function(path) that draws a PNG
    wrapper: dict | None = None  # {"class", "args"} when the repaired model wraps the original (BNA)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a plot is drawn (plotting is optional)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> bool:
    """Lay out, write the PNG and free the figure; True for the plot callbacks of DefenseResult."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return True


@torch.no_grad()
def accuracy(model: nn.Module, data: CleanData, batch_size: int = 256, device="cpu") -> float:
    correct = 0
    for x, y in data.batches(batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(data)


def config_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: makes a defense available by its `name` (CLI, demo, load)."""
    REGISTRY[cls.name] = cls
    return cls


# --------------------------------------------------------------------------- config validation
# Each config dataclass has a table of rules, one per field (UNIT_RULES, BNA_RULES, ...), checked by `validate`
# in its __post_init__: a wrong type, NaN, ±inf or a value out of range is refused with one line naming the field.

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple = 60, 60, 3, 6, 6


def shown(value) -> str:
    """A short one-line repr of a (possibly huge or deeply nested) value, for error messages."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return " ".join(text.split())


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    """What a config field must be: `test(value)` says whether it is, `description` says it in words."""
    description: str  # completes "<Config>.<field> must be ..."
    test: Callable[[Any], bool]

    def __call__(self, value) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, OverflowError):
            return False


def _optional(rule: Rule, optional: bool) -> Rule:
    if not optional:
        return rule
    return Rule(f"None or {rule.description}", lambda v: v is None or rule(v))


def _interval(low, high, above, below) -> tuple[str, Callable[[Any], bool]]:
    """The words and the test of a range; low/high are inclusive, above/below exclusive."""
    if low is not None and above is not None or high is not None and below is not None:
        raise TypeError("give at most one lower bound (low or above) and one upper bound (high or below)")
    lo, lo_open = (above, True) if above is not None else (low, False)
    hi, hi_open = (below, True) if below is not None else (high, False)
    if lo is not None and hi is not None:
        words = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        words = f"{'<' if hi_open else '<='} {hi}"
    else:
        words = ""

    def inside(v) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo)) and
                (hi is None or (v < hi if hi_open else v <= hi)))
    return words, inside


def choice(*values) -> Rule:
    """One of `values` (compared with their type: True is not 1)."""
    return Rule(f"one of {', '.join(map(repr, values))}",
                lambda v: any(type(v) is type(c) and v == c for c in values))


def integer(low: int | None = None, high: int | None = None, optional: bool = False) -> Rule:
    """An integer (not a bool, not a float) in [low, high]; None too when optional."""
    words, inside = _interval(low, high, None, None)
    return _optional(Rule(f"an integer {words}".rstrip(), lambda v: _is_integer(v) and inside(v)), optional)


def real(low=None, high=None, above=None, below=None, optional: bool = False) -> Rule:
    """A finite number (int or float, never a bool, NaN or ±inf) in the range: low/high inclusive,
    above/below exclusive; None too when optional."""
    words, inside = _interval(low, high, above, below)
    return _optional(Rule(f"a finite number {words}".rstrip(), lambda v: _is_finite(v) and inside(v)), optional)


def pair(rule: Rule) -> Rule:
    """A tuple (or list) of two values, each satisfying `rule`."""
    return Rule(f"a pair (a, b), each {rule.description}",
                lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(rule(x) for x in v))


def text(nonempty: bool = True) -> Rule:
    """A string (non-empty, and not only spaces, unless told)."""
    return Rule("a non-empty string" if nonempty else "a string",
                lambda v: isinstance(v, str) and (not nonempty or bool(v.strip())))


flag = Rule("True or False", lambda v: isinstance(v, bool))
FRACTION = real(0, 1)  # a fraction in [0, 1]
POSITIVE = real(above=0)  # learning rates, temperatures, widths
NONNEGATIVE = real(0)  # weight decay, noise, radii
MOMENTUM = real(0, below=1)  # SGD momentum
COUNT = integer(1)  # batch sizes, steps that must happen at least once
EPOCHS = integer(0)  # passes that may be skipped
SEED = integer(0, 2**63 - 1)


def validate(config, name: str | None, rules: dict[str, Rule]) -> None:
    """Checks every field of the dataclass `config` against its rule in `rules`.

    Raises ValueError, one line, for the first field out of its rule ("TSBDConfig.lr must be a finite number > 0,
    got inf"). A field without a rule (or a rule without a field) is a programming error: TypeError.
    """
    name = name or type(config).__name__
    fields = [f.name for f in dataclasses.fields(config)]
    if set(fields) != set(rules):
        missing, extra = sorted(set(fields) - set(rules)), sorted(set(rules) - set(fields))
        raise TypeError(f"{name} rules do not match its fields (no rule for {missing}, no field for {extra})")
    for key in fields:
        value = getattr(config, key)
        if not rules[key](value):
            raise ValueError(f"{name}.{key} must be {rules[key].description}, got {shown(value)}")


def preset(func):
    """Declares a config classmethod as a preset: `Config.name(**overrides)` returns a config.

    Only methods declared so are reachable by name (`preset_config`, the CLI's --preset).
    """
    func.is_preset = True
    return classmethod(func)


def presets(cls) -> list[str]:
    """The names of the presets the config class declares (with @preset), in declaration order."""
    names = []
    for klass in reversed(cls.__mro__):
        for key, attr in vars(klass).items():
            if (isinstance(attr, classmethod) and getattr(attr.__func__, "is_preset", False)
                    and not key.startswith("_") and key not in names):
                names.append(key)
    return names


def preset_config(cls, name: str, overrides: dict | None = None):
    """The config class's declared preset `name`, with `overrides` (field -> value) on top of it."""
    declared = presets(cls)
    if not isinstance(name, str) or name not in declared:
        known = f"presets: {', '.join(declared)}" if declared else "it declares none"
        raise ValueError(f"{cls.__name__} has no preset {shown(name)} ({known})")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}")
    config = getattr(cls, name)(**overrides)
    if not isinstance(config, cls):
        raise TypeError(f"preset {cls.__name__}.{name} returned {type(config).__name__}, not {cls.__name__}")
    return config
