"""Config validation, table-driven: every field of the four defense configs refuses NaN, ±inf, wrong types and
out-of-range values with one line naming it; presets, --set parsing, clean indices and clean data."""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pydefend.defend import checked_indices, parse_overrides, run_defense
from pydefend.defenses import BNAConfig, CleanData, TSBDConfig, UNITConfig, UniBPConfig
from pydefend.defenses.base import (FRACTION, SEED, choice, flag, integer, pair, preset, preset_config, presets, real,
                                    text, validate)
from pydefend.defenses.bna import BNA_RULES
from pydefend.defenses.tsbd import TSBD_RULES
from pydefend.defenses.unibp import UNIBP_RULES
from pydefend.defenses.unit import UNIT_RULES

RULES = {UNITConfig: UNIT_RULES, BNAConfig: BNA_RULES, TSBDConfig: TSBD_RULES, UniBPConfig: UNIBP_RULES}
NAN, INF = math.nan, math.inf

# Field-specific bad values: negative, out of range, a bool or float where an integer goes, unknown choices.
BAD = {
    UNITConfig: {
        "steps": [-1, 2.0, True], "lr": [0, -1e-3], "betas": [5, (0.9,), (0.9, 1.0), (-0.1, 0.9), (0.9, NAN),
                                                             (0.9, 0.99, 0.1), "0.9,0.99", (True, 0.5)],
        "alpha0": [0, -1], "epsilon": [-0.01, 1.5], "val_fraction": [0, 1, -0.2, 2], "init_std": [-4],
        "granularity": ["layer", ""], "penalty": ["l2"], "schedule": ["cosine"], "patience": [0, -5, 1.5],
        "clamp_nonnegative": [1, "true"], "attention": [0, "yes"], "batch_size": [0, -3, 12.5, False],
        "step_unit": ["pass"], "seed": [-1, 2 ** 64, 0.5],
    },
    BNAConfig: {
        "detection": ["source"], "trigger": ["blend"], "threshold": [-0.5, -2, "2"], "statistic": ["sqrt"],
        "re_steps": [0, -300], "re_batch_size": [0], "re_max_images": [0, 1.5], "re_lr": [0, -0.1],
        "re_init_cost": [0, -1e-3], "re_cost_multiplier": [1, 0.5, -1.5], "re_check_every": [0],
        "re_patience": [0, -3], "re_success": [0, 1.01, -0.5], "layers": ["", "   ", 3, ["bn"]],
        "divergence": ["w1"], "tau": [0, -150], "bin_width": [0, -0.1], "epochs": [-1, 2.5], "lr": [0, -0.01],
        "batch_size": [0, -3], "seed": [-3],
    },
    TSBDConfig: {
        "unlearn_lr": [0, -1e-4], "unlearn_momentum": [-0.1, 1, 1.5], "unlearn_threshold": [-0.1, 1.1],
        "unlearn_check": ["step"], "max_unlearn_epochs": [0, -1, 10.0], "layers": ["bn", "conv,linear"],
        "neuron_ratio": [15, -0.15], "weight_ratio": [70, -0.7], "selection": ["layer"], "finetune_epochs": [-1],
        "finetune_lr": [-0.01], "finetune_momentum": [-0.9, 1], "finetune_augment": ["flip"],
        "finetune_weight_decay": [-5e-4], "finetune_schedule": ["step"], "r": [-0.05], "alpha": [-0.7, 1.7],
        "perturb_norm": ["layer"], "batch_size": [0, -3], "inplace": [1, "True"], "seed": [-1],
    },
    UniBPConfig: {
        "ratio": [-0.03, 1.5], "ratio_of": ["bn"], "k": [-1, 2.5, True], "mask_params": ["gamma"],
        "base": ["clean"], "noise_std": [-0.01], "reset_weight": [True, "1"], "reset_bias": [False, "0"],
        "var_weight": [-0.05], "rectify_epochs": [0, -5], "fisher_epochs": [0, -1, 1.0], "rectify_lr": [0, -2e-3],
        "rectify_params": ["bn"], "epochs": [-20], "finetune_augment": ["flip"], "lr": [0, -0.002],
        "momentum": [-0.9, 1.0], "weight_decay": [-1e-4], "batch_size": [0, -3], "seed": [-1, 1.5],
    },
}

# Values every field refuses: NaN, ±inf and objects of no field's type.
EVERYWHERE = [NAN, INF, -INF, None, object(), {}, b"1"]
NULLABLE = {(BNAConfig, "threshold"), (UniBPConfig, "k"), (UniBPConfig, "fisher_epochs")}

# Accepted values, boundaries included.
GOOD = {
    UNITConfig: dict(steps=0, lr=1, betas=[0.0, 0.5], alpha0=1e-9, epsilon=1, val_fraction=0.999, init_std=0,
                     granularity="channel", penalty="layer_mean", schedule="patience", patience=1,
                     clamp_nonnegative=True, attention=False, batch_size=1, step_unit="full", seed=2 ** 63 - 1),
    BNAConfig: dict(detection="pairs", trigger="both", threshold=7, statistic="linear", re_steps=1, re_batch_size=1,
                    re_max_images=1, re_lr=1, re_init_cost=1e-9, re_cost_multiplier=1.01, re_check_every=1,
                    re_patience=1, re_success=1, layers="layer1.0.bn1,BatchNorm2d", divergence="kl", tau=1e-3,
                    bin_width=5, epochs=0, lr=10, batch_size=1, seed=7),
    TSBDConfig: dict(unlearn_lr=1, unlearn_momentum=0, unlearn_threshold=0, unlearn_check="epoch",
                     max_unlearn_epochs=1, layers="conv+linear", neuron_ratio=1, weight_ratio=0, selection="per_neuron",
                     finetune_epochs=0, finetune_lr=0, finetune_momentum=0.99, finetune_augment="crop+flip",
                     finetune_weight_decay=0, finetune_schedule="constant", r=0, alpha=1, perturb_norm="per_tensor",
                     batch_size=1, inplace=False, seed=0),
    UniBPConfig: dict(ratio=0, ratio_of="all", k=0, mask_params="weight", base="rectified", noise_std=0,
                      reset_weight=-2.5, reset_bias=np.float64(0.5), var_weight=0, rectify_epochs=3, fisher_epochs=3,
                      rectify_lr=1, rectify_params="norm", epochs=0, finetune_augment="none", lr=np.float32(1e-3),
                      momentum=0, weight_decay=0, batch_size=np.int64(1), seed=1),
}


def _field_cases(table):
    return [pytest.param(cls, key, value, id=f"{cls.__name__}.{key}={value!r}")
            for cls, fields in table.items() for key, values in fields.items() for value in values]


def test_tables_cover_every_field():
    for cls, rules in RULES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(rules) == names, cls
        assert set(BAD[cls]) == names and set(GOOD[cls]) == names, cls


@pytest.mark.parametrize("cls,key,value", _field_cases(BAD))
def test_bad_value_is_refused_naming_the_field(cls, key, value):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{key} must be ") as info:
        cls(**{key: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls,key,value", _field_cases(
    {cls: {f.name: [v for v in EVERYWHERE if not (v is None and (cls, f.name) in NULLABLE)]
           for f in dataclasses.fields(cls)} for cls in RULES}))
def test_nan_inf_and_wrong_types_are_refused_everywhere(cls, key, value):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{key} must be "):
        cls(**{key: value})


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_defaults_presets_and_good_values_validate(cls):
    cls()
    for name in presets(cls):
        assert isinstance(preset_config(cls, name, {}), cls)
    for key, value in GOOD[cls].items():
        assert getattr(cls(**{key: value}), key) == value
    cls(**GOOD[cls])  # all at once
    for key in ("threshold", "k", "fisher_epochs"):
        if key in RULES[cls]:
            assert getattr(cls(**{key: None}), key) is None


def test_declared_presets():
    assert presets(UNITConfig) == presets(TSBDConfig) == ["official"]
    assert presets(BNAConfig) == presets(UniBPConfig) == []
    official = preset_config(UNITConfig, "official", {"steps": 7})
    assert (official.steps, official.betas, official.step_unit) == (7, (0.5, 0.9), "full")
    with pytest.raises(ValueError, match=r"UNITConfig.epsilon must be .*got nan"):
        preset_config(UNITConfig, "official", {"epsilon": NAN})


@pytest.mark.parametrize("name", ["__init__", "__class__", "__post_init__", "mro", "__subclasshook__", "fastest",
                                  "official ", "", None, 3])
def test_only_declared_presets_are_reachable(name):
    with pytest.raises(ValueError, match=r"UNITConfig has no preset .*\(presets: official\)"):
        preset_config(UNITConfig, name, {})
    with pytest.raises(ValueError, match=r"BNAConfig has no preset .*it declares none"):
        preset_config(BNAConfig, "official" if name is None else name, {})


def test_an_undeclared_classmethod_is_no_preset():
    @dataclasses.dataclass
    class Config:
        n: int = 1

        def __post_init__(self):
            validate(self, None, {"n": integer(1)})

        @classmethod
        def helper(cls, **overrides):
            return cls(**overrides)

        @preset
        def big(cls, **overrides):
            return cls(**{"n": 100, **overrides})

    assert presets(Config) == ["big"] and preset_config(Config, "big", {}).n == 100
    with pytest.raises(ValueError, match="has no preset 'helper'"):
        preset_config(Config, "helper", {})
    with pytest.raises(ValueError, match="no field 'm'"):
        preset_config(Config, "big", {"m": 1})
    with pytest.raises(ValueError, match=r"^Config.n must be an integer >= 1, got 0$"):
        Config(0)


def test_validate_wants_a_rule_per_field():
    @dataclasses.dataclass
    class Config:
        a: float = 1.0
        b: int = 2

    with pytest.raises(TypeError, match=r"no rule for \['b'\]"):
        validate(Config(), "Config", {"a": real()})
    validate(Config(), "Config", {"a": real(), "b": integer()})


def test_rule_helpers():
    assert real(above=0)(1e-300) and not real(above=0)(0) and not real()(NAN) and not real()(True)
    assert real(0, 1)(0) and real(0, 1)(1) and not real(0, below=1)(1) and not real(above=0, high=1)(0)
    assert real(optional=True)(None) and not real()(None) and not real()("1") and real()(np.float32(2))
    assert integer(0)(0) and integer(0)(np.int64(3)) and not integer(0)(-1) and not integer()(1.0)
    assert not integer()(True) and integer(1, 3)(3) and not integer(1, 3)(4) and integer(optional=True)(None)
    assert choice("a", "b")("a") and not choice("a")("A") and not choice(1, 2)(True) and not choice("a")(["a"])
    assert flag(True) and flag(False) and not flag(1) and not flag(None)
    assert pair(FRACTION)((0, 1)) and pair(FRACTION)([0.5, 0.5]) and not pair(FRACTION)((0, 2))
    assert not pair(FRACTION)(0.5) and not pair(FRACTION)("ab") and not pair(FRACTION)((0.5,))
    assert text()("bn") and not text()("") and not text()(None) and SEED(0) and not SEED(-1)
    assert FRACTION.description == "a finite number in [0, 1]"
    assert real(above=0).description == "a finite number > 0" and real().description == "a finite number"
    assert integer(1).description == "an integer >= 1"
    with pytest.raises(TypeError):
        real(low=0, above=0)


def test_message_format():
    with pytest.raises(ValueError) as info:
        TSBDConfig(finetune_lr=INF)
    assert str(info.value) == "TSBDConfig.finetune_lr must be a finite number >= 0, got inf"
    with pytest.raises(ValueError) as info:
        UNITConfig(granularity="x" * 10_000)
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:
        UNITConfig(betas=torch.zeros(100, 100))  # a multi-line repr
    assert "\n" not in str(info.value)


def test_cross_field_rule():
    UniBPConfig(rectify_epochs=2, fisher_epochs=2)
    with pytest.raises(ValueError, match=r"fisher_epochs must be <= rectify_epochs \(2\)"):
        UniBPConfig(rectify_epochs=2, fisher_epochs=3)


# --------------------------------------------------------------------------- --set and --preset
@pytest.mark.parametrize("cls,pairs,preset_name,message", [
    (UNITConfig, ["betas=5"], None, r"UNITConfig\.betas must be a pair"),
    (UNITConfig, ["batch_size=-3"], None, r"UNITConfig\.batch_size must be an integer >= 1, got -3"),
    (UNITConfig, [], "__init__", r"UNITConfig has no preset '__init__'"),
    (UNITConfig, ["steps=3"], "__class__", r"has no preset '__class__'"),
    (UNITConfig, ["epsilon=nan"], None, r"UNITConfig\.epsilon must be .*got nan"),
    (UNITConfig, ["lr=inf"], None, r"UNITConfig\.lr must be a finite number > 0, got inf"),
    (UNITConfig, ["lr=-inf"], "official", r"UNITConfig\.lr must be"),
    (UNITConfig, ["betas=" + "[" * 100_000], None, r"bad value for betas: .*nested too deeply"),
    (UNITConfig, ["betas=" + "[" * 100_000 + "]" * 100_000], None, r"bad value for betas: .*nested too deeply"),
    (UNITConfig, ["betas=[0.9, Infinity]"], None, r"UNITConfig\.betas must be"),
    (UNITConfig, ["betas={\"a\": 1}"], None, r"UNITConfig\.betas must be"),
    (UNITConfig, ["steps=" + "9" * 10_000], None, r"bad value for steps"),
    (UNITConfig, ["steps=" + "9" * 10_000, "x" * 10_000], None, r"bad value for steps"),
    (UNITConfig, ["x" * 10_000], None, r"bad setting"),
    (BNAConfig, ["threshold=NaN"], None, r"BNAConfig\.threshold must be None or a finite number >= 0, got nan"),
    (BNAConfig, [], "official", r"BNAConfig has no preset 'official' \(it declares none\)"),
    (UniBPConfig, ["k=true"], None, r"UniBPConfig\.k must be None or an integer >= 0, got True"),
    (UniBPConfig, ["k=2.5"], None, r"UniBPConfig\.k must be"),
    (UniBPConfig, ["fisher_epochs=9"], None, r"fisher_epochs must be <= rectify_epochs"),
    (TSBDConfig, ["neuron_ratio=15"], None, r"TSBDConfig\.neuron_ratio must be a finite number in \[0, 1\]"),
    (TSBDConfig, ["seed=-1"], "official", r"TSBDConfig\.seed must be"),
])
def test_parse_overrides_refuses_in_one_line(cls, pairs, preset_name, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_overrides(cls, pairs, preset_name)
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000


def test_parse_overrides_accepts_good_values():
    config = parse_overrides(UNITConfig, ["betas=[0.5, 0.9]", "steps=0", "epsilon=1", "attention=no"], "official")
    assert (config.betas, config.steps, config.epsilon, config.attention) == ((0.5, 0.9), 0, 1.0, False)
    assert config.penalty == "layer_mean"  # the preset under the overrides
    assert parse_overrides(BNAConfig, ["threshold=null"]).threshold is None
    assert parse_overrides(BNAConfig, ["threshold=3.5", "layers=bn"]).threshold == 3.5
    unibp = parse_overrides(UniBPConfig, ["k=5", "fisher_epochs=1", "reset_bias=-0.5"])
    assert (unibp.k, unibp.fisher_epochs, unibp.reset_bias) == (5, 1, -0.5)
    assert parse_overrides(TSBDConfig, ["inplace=false"], "official").inplace is False


def test_cli_refuses_bad_settings_in_one_line_exit_2(capsys, tmp_path):
    from pydefend.cli import main
    for extra, message in ((["--set", "betas=5"], "UNITConfig.betas must be"),
                           (["--set", "batch_size=-3"], "UNITConfig.batch_size must be"),
                           (["--preset", "__init__"], "has no preset '__init__'"),
                           (["--set", "epsilon=nan"], "UNITConfig.epsilon must be"),
                           (["--set", "lr=inf"], "UNITConfig.lr must be"),
                           (["--set", "betas=" + "[" * 100_000], "nested too deeply")):
        argv = ["defend", "--method", "unit", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- clean indices and clean data
@pytest.mark.parametrize("indices,message", [
    ([3] * 50, r"must be distinct, but 1 index repeats \(e\.g\. 3 appears 50 times\)"),
    ([0, 1, 1, 2, 2], r"must be distinct, but 2 indices repeat"),
    (torch.tensor([4, 4]), r"must be distinct"),
    (np.array([5, 6, 5]), r"must be distinct"),
    ([0, 10], r"must be in \[0, 10\) .*got 10"),
    ([0, -1], r"must be in \[0, 10\) .*got -1"),
    ([0, 2 ** 70], r"must be in \[0, 10\)"),
    (torch.tensor([0, 99]), r"must be in \[0, 10\)"),
    (np.array([0, -3]), r"must be in \[0, 10\)"),
    (np.array([0, 2 ** 64 - 1], dtype=np.uint64), r"must be in \[0, 10\)"),
    ([0, 1.0], r"must be integers, got 1\.0"),
    ([0, True], r"must be integers, got True"),
    ([0, "1"], r"must be integers"),
    (torch.tensor([0.0, 1.0]), r"must be integers, got a torch\.float32 tensor"),
    (torch.tensor([True, False]), r"must be integers"),
    (np.array([0.0, 1.0]), r"must be integers"),
    ("01", r"must be a list or tensor of integers"),
    (None, r"must be a list or tensor of integers"),
    ([[0, 1], [2, 3]], r"must be integers"),
    (torch.tensor([[0, 1], [2, 3]]), r"one-dimensional"),
    ([], r"at least two clean samples, got 0"),
    ([4], r"at least two clean samples, got 1"),
    (torch.tensor([4]), r"at least two clean samples, got 1"),
])
def test_checked_indices_refuses(indices, message):
    with pytest.raises(ValueError, match=message) as info:
        checked_indices(indices, 10)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("indices", [[0, 9], (3, 1, 2), range(10), torch.tensor([7, 2], dtype=torch.int32),
                                     np.array([1, 2, 3], dtype=np.uint8), [np.int64(4), 5]])
def test_checked_indices_accepts(indices):
    idx = checked_indices(indices, 10)
    assert idx.dtype == torch.int64 and idx.tolist() == [int(i) for i in indices]


def test_run_defense_checks_indices_first():
    dataset = SimpleNamespace(x_train=torch.zeros(10, 3), y_train=torch.zeros(10, dtype=torch.long), num_classes=2)
    for indices, message in (([3] * 50, "distinct"), ([0, 12], r"\[0, 10\)"), ([1], "at least two")):
        with pytest.raises(ValueError, match=message):
            run_defense("unit", None, dataset, None, indices, progress=False)


@pytest.mark.parametrize("x,y,num_classes,message", [
    (torch.rand(3, 2), torch.tensor([0, 1, 2]), 2, r"clean labels must be in \[0, 2\) .*from 0 to 2"),
    (torch.rand(3, 2), torch.tensor([0, -1, 1]), 2, r"clean labels must be in \[0, 2\)"),
    (torch.rand(3, 2), torch.tensor([0.0, 1.0, 1.0]), 2, r"1-D int64 tensor, got a torch\.float32 tensor"),
    (torch.rand(3, 2), torch.tensor([0, 1, 1], dtype=torch.int32), 2, r"1-D int64 tensor"),
    (torch.rand(3, 2), torch.tensor([[0], [1], [1]]), 2, r"1-D int64 tensor.*shape \(3, 1\)"),
    (torch.rand(3, 2), [0, 1, 1], 2, r"1-D int64 tensor"),
    (torch.rand(3, 2), torch.tensor([0, 1]), 2, r"3 images but 2 labels"),
    (torch.rand(1, 2), torch.tensor([0]), 2, r"at least two clean samples"),
    (torch.rand(3, 2), torch.tensor([0, 0, 0]), 1, r"num_classes, an integer >= 2, got 1"),
    (torch.rand(3, 2), torch.tensor([0, 0, 0]), 2.0, r"num_classes, an integer >= 2, got 2\.0"),
    (torch.rand(3, 2), torch.tensor([0, 0, 0]), True, r"num_classes, an integer >= 2, got True"),
    (torch.rand(3, 2), torch.tensor([0, 0, 0]), None, r"num_classes"),
    (np.zeros((3, 2)), torch.tensor([0, 0, 0]), 2, r"clean images must be a tensor"),
])
def test_clean_data_refuses(x, y, num_classes, message):
    with pytest.raises(ValueError, match=message):
        CleanData(x, y, num_classes)


def test_clean_data_accepts_and_splits():
    clean = CleanData(torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]), np.int64(3))
    assert clean.num_classes == 3 and type(clean.num_classes) is int
    first, second = clean.split(0.5, seed=0)
    assert len(first) + len(second) == 6 and first.num_classes == second.num_classes == 3
