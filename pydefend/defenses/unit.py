"""UNIT: neural distribution tightening (Cheng et al., "UNIT: Backdoor Mitigation via Automated Neural Distribution
Tightening", ECCV 2024, arXiv:2407.11372; §4.4, Algorithm 1).

1. Trace the model and put an upper bound after every activation (ReLU; GELU
   and attention outputs in transformers). Bounds are per element of the
   feature map (σ "can be a feature map", as the authors' code) or per channel.
2. Initialise each bound at mean + 4·std of its activation over the clean
   training part (the clean data minus a validation part, n_v/n_t = 1/4).
3. For S steps: descend CE + α·‖σ‖₁ over the training part (weights frozen:
   only σ learns), then measure the validation accuracy P'. α halves when
   P0 − P' > ε, else doubles. Keep σ* = the bounds with the smallest ‖σ‖₁
   among those with P' ≥ P0 − ε.

A step of Algorithm 1 takes the loss over all n_t training samples (line 5).
By default (`step_unit="epoch"`) it is a pass over them in mini-batches with
one Adam update per mini-batch; `step_unit="batch"` makes a step one
mini-batch update, which moves each bound by at most about lr per step and
left the Blended backdoor in place (results/unit.md).

ReLU sites use the fused clip (min(max(x, 0), σ)) whose backward keeps a
2-bit mask instead of the activation, and while σ is learned, convolutions,
linear layers and eval-mode BatchNorm run as frozen-weight stand-ins that
keep no activations (pydefend/frozen.py): the masks are what stays alive.

Defaults follow the paper; `UNITConfig.official()` gives the authors' code:
300 steps of one update on the whole training part, ε = 3 %, Adam betas
(0.5, 0.9), penalty Σ over layers of the mean bound, a patience-5 schedule
(×2 after 5 steps within budget, ÷2^1.5 after 5 outside, back to α0 after 5
within budget below it) and bounds clamped ≥ 0.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import graph
from ..frozen import frozen_layers
from ..monitor import PhaseRecorder
from ..ops.channel_clip import ChannelClip
from ..progress import progress_bar
from .base import (COUNT, EPOCHS, FRACTION, NONNEGATIVE, POSITIVE, SEED, CleanData, DefenseResult, accuracy, choice,
                   config_dict, flag, pair, preset, pyplot, real, register, save_figure, validate)


@dataclass
class UNITConfig:
    steps: int = 50
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    alpha0: float = 1e-3
    epsilon: float = 0.02  # allowed validation accuracy drop (fraction)
    val_fraction: float = 0.2  # of the clean data: n_v / n_t = 1/4
    init_std: float = 4.0  # σ0 = mean + init_std · std
    granularity: str = "element"  # "element" (bound per feature-map element) or "channel"
    penalty: str = "l1"  # "l1": α‖σ‖₁ (paper) or "layer_mean": α Σ_l mean(σ_l) (authors' code)
    schedule: str = "paper"  # "paper": ×2 / ÷2 every step; "patience": authors' code
    patience: int = 5
    clamp_nonnegative: bool = False
    attention: bool = True  # also bound nn.MultiheadAttention outputs
    batch_size: int = 128
    # A step: one Adam update per mini-batch over the training part ("epoch"), one update on a single
    # mini-batch ("batch"), or one update on the whole training part, accumulated over mini-batches ("full").
    step_unit: str = "epoch"
    seed: int = 0

    def __post_init__(self):
        validate(self, "UNITConfig", UNIT_RULES)

    @preset
    def official(cls, **overrides) -> "UNITConfig":
        """The settings of the authors' released code."""
        base = dict(steps=300, step_unit="full", epsilon=0.03, betas=(0.5, 0.9), penalty="layer_mean", schedule="patience",
                    clamp_nonnegative=True)
        return cls(**{**base, **overrides})


UNIT_RULES = {
    "steps": EPOCHS,  # 0: the bounds at their initial values
    "lr": POSITIVE,
    "betas": pair(real(0, below=1)),  # Adam's β1, β2
    "alpha0": POSITIVE,  # α only ever doubles or halves: from 0 it would stay 0
    "epsilon": FRACTION,  # an accuracy drop
    "val_fraction": real(above=0, below=1),
    "init_std": NONNEGATIVE,
    "granularity": choice("element", "channel"),
    "penalty": choice("l1", "layer_mean"),
    "schedule": choice("paper", "patience"),
    "patience": COUNT,
    "clamp_nonnegative": flag,
    "attention": flag,
    "batch_size": COUNT,
    "step_unit": choice("epoch", "batch", "full"),
    "seed": SEED,
}


def _channel_dim(shape) -> int:
    """Feature maps (N, C, ...) bound per dim 1; token tensors (N, L, D) per the last dim."""
    return 1 if len(shape) != 3 else 2


class _ActivationStats:
    """Per-site float64 sums for mean and std at the chosen granularity."""

    def __init__(self, granularity: str):
        self.granularity = granularity
        self.sum, self.sumsq, self.count, self.shape, self.channel_dim = {}, {}, {}, {}, {}

    def add(self, name: str, act: torch.Tensor):
        a = act.detach().double()
        if self.granularity == "element" or a.dim() == 2:
            cd, dims, shape = 1, (0,), tuple(a.shape[1:])
        else:
            cd = _channel_dim(a.shape)
            dims = tuple(d for d in range(a.dim()) if d != cd)
            shape = (a.shape[cd],)
        self.channel_dim[name] = cd
        if name in self.shape and self.shape[name] != shape:
            raise ValueError(f"activation at {name} changed shape {self.shape[name]} -> {shape} between batches")
        self.shape[name] = shape
        self.sum[name] = self.sum.get(name, 0) + a.sum(dims).reshape(shape)
        self.sumsq[name] = self.sumsq.get(name, 0) + (a * a).sum(dims).reshape(shape)
        self.count[name] = self.count.get(name, 0) + a.numel() // math.prod(shape)

    def bound(self, name: str, k: float) -> torch.Tensor:
        mean = self.sum[name] / self.count[name]
        var = (self.sumsq[name] / self.count[name] - mean * mean).clamp_min(0)
        return (mean + k * var.sqrt()).float()


@register
class UNIT:
    name = "unit"
    Config = UNITConfig

    def __init__(self, bound_module=ChannelClip, freeze_weights: bool = True):
        # The two knobs exist for the benchmark's eager baseline (bench/bench_unit.py).
        self.bound_module, self.freeze_weights = bound_module, freeze_weights

    def run(self, model: nn.Module, clean: CleanData, config: UNITConfig | None = None, device="cpu",
            progress: bool = True) -> DefenseResult:
        config = config or UNITConfig()
        phases = PhaseRecorder(device)
        model = model.to(device).eval()
        train, val = clean.split(config.val_fraction, config.seed)

        with phases.phase("initialise"):
            located = graph.locate(model, attention=config.attention)
            sites = located.sites
            if not sites:
                raise ValueError(f"UNIT found no activation (ReLU, GELU, ...) to bound in this model ({located.note})")
            stats = _ActivationStats(config.granularity)
            located.capture((x.to(device) for x, _ in train.batches(config.batch_size)), stats.add)
            bounds, inserted = {}, []
            for site in sites:
                shape = stats.shape[site.node]
                channel_dim = stats.channel_dim[site.node]
                relu = site.kind == "relu"
                module = self.bound_module(shape, channel_dim=channel_dim, relu=relu, device=device)
                with torch.no_grad():
                    module.upper.copy_(stats.bound(site.node, config.init_std))
                bounds[site.node] = module
                inserted.append({"node": site.node, "via": located.via, "kind": site.kind, "module": "ChannelClip",
                                 "args": {"shape": list(shape), "channel_dim": channel_dim, "relu": relu}})
            bounded = located.insert(bounds).eval()
            for p in bounded.parameters():
                p.requires_grad_(False)
            uppers = [bounds[s.node].upper for s in sites]
            for u in uppers:
                u.requires_grad_(True)
            if not self.freeze_weights:
                for p in model.parameters():
                    p.requires_grad_(True)
            p0 = accuracy(model, val, device=device)
            p_init = accuracy(bounded, val, device=device)

        with phases.phase("tighten"), frozen_layers(bounded) if self.freeze_weights else nullcontext():
            trace = self._tighten(bounded, uppers, train, val, p0, p_init, config, device, progress)

        report = {
            "defense": self.name, "config": config_dict(config),
            "clean_samples": {"train": len(train), "validation": len(val)},
            "validation_accuracy": {"original": p0, "initial_bounds": p_init, "final": trace["best_accuracy"]},
            "budget_met": trace["best_step"] is not None or p0 - p_init <= config.epsilon,
            "best_step": trace["best_step"],
            "sites_found_by": located.note,
            "sites": [{"node": s.node, "kind": s.kind, "shape": list(bounds[s.node].upper.shape),
                       "mean_bound_initial": trace["initial_means"][i],
                       "mean_bound_final": float(bounds[s.node].upper.detach().mean())}
                      for i, s in enumerate(sites)],
            "steps": trace["steps"],
            "phases": phases.to_dict(),
        }
        for u in uppers:
            u.requires_grad_(False)
        plots = {"unit_tightening.png": lambda path: _plot_trace(report, config, path),
                 "unit_bounds.png": lambda path: _plot_bounds(report, path)}
        return DefenseResult(bounded, report, inserted, plots)

    def _tighten(self, bounded, uppers, train, val, p0, p_init, config, device, progress):
        opt = torch.optim.Adam(uppers, lr=config.lr, betas=config.betas)
        schedule = AlphaSchedule(config)
        l1 = lambda: sum(float(u.detach().abs().sum()) for u in uppers)  # noqa: E731
        best = [u.detach().clone() for u in uppers]  # σ* = σ0 (Algorithm 1, line 2)
        best_norm, best_acc, best_step = l1(), p_init, None
        initial_means = [float(u.detach().mean()) for u in uppers]
        steps = []
        batches = train.endless_batches(config.batch_size, config.seed)
        bar = progress_bar(range(config.steps), "UNIT tighten", enabled=progress)
        for step in bar:
            losses = []
            for n, group in _updates_of_step(config, train, batches):
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for x, y in group:  # several mini-batches only for step_unit="full": gradients accumulate
                    ce = F.cross_entropy(bounded(x.to(device)), y.to(device), reduction="sum") / n
                    ce.backward()
                    loss += float(ce.detach())
                penalty = schedule.alpha * (sum(u.abs().sum() for u in uppers) if config.penalty == "l1"
                                   else sum(u.mean() for u in uppers))
                penalty.backward()
                opt.step()
                losses.append(loss + float(penalty.detach()))
                if config.clamp_nonnegative:
                    with torch.no_grad():
                        for u in uppers:
                            u.clamp_(min=0)
            acc = accuracy(bounded, val, device=device)
            norm = l1()
            if acc >= p0 - config.epsilon and norm < best_norm:
                best = [u.detach().clone() for u in uppers]
                best_norm, best_acc, best_step = norm, acc, step + 1
            steps.append({"step": step + 1, "loss": sum(losses) / len(losses), "alpha": schedule.alpha,
                          "val_accuracy": acc, "l1": norm})
            schedule.update(over_budget=p0 - acc > config.epsilon)
            bar.set_postfix(acc=f"{acc:.3f}", alpha=f"{schedule.alpha:.1e}")
        with torch.no_grad():
            for u, b in zip(uppers, best):
                u.copy_(b)
        return {"steps": steps, "best_step": best_step, "best_accuracy": best_acc, "initial_means": initial_means}


def _updates_of_step(config, train, batches):
    """A step's Adam updates: (sample count, the mini-batches whose mean loss the update descends)."""
    if config.step_unit == "full":  # one update on the whole training part
        yield len(train), train.batches(config.batch_size)
        return
    for _ in range(1 if config.step_unit == "batch" else math.ceil(len(train) / config.batch_size)):
        x, y = next(batches)
        yield len(y), [(x, y)]


class AlphaSchedule:
    """α after each step: the paper's ×2 / ÷2 every step, or the authors' patience schedule."""

    def __init__(self, config: UNITConfig):
        self.config, self.alpha = config, config.alpha0
        self.within = self.outside = self.below_start = 0

    def update(self, over_budget: bool) -> float:
        c = self.config
        if c.schedule == "paper":
            self.alpha = self.alpha / 2 if over_budget else self.alpha * 2
            return self.alpha
        # The authors' code (Neural-Cleanse style): α returns to α0 after `patience` steps within budget
        # below it, and moves only after `patience` steps in a row on one side of the budget.
        if self.alpha < c.alpha0 and not over_budget:
            self.below_start += 1
            if self.below_start >= c.patience:
                self.alpha, self.within, self.outside, self.below_start = c.alpha0, 0, 0, 0
        else:
            self.below_start = 0
        self.within, self.outside = (0, self.outside + 1) if over_budget else (self.within + 1, 0)
        if self.within >= c.patience:
            self.within, self.alpha = 0, self.alpha * 2
        if self.outside >= c.patience:
            self.outside, self.alpha = 0, self.alpha / 2 ** 1.5
        return self.alpha


def _plot_trace(report, config, path):
    plt = pyplot()
    steps = report["steps"]
    if not steps:
        return False
    s = [r["step"] for r in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    p0 = report["validation_accuracy"]["original"]
    axes[0].plot(s, [r["val_accuracy"] for r in steps], label="validation accuracy")
    axes[0].axhline(p0 - config.epsilon, color="red", ls="--", label=f"P0 − ε = {p0 - config.epsilon:.3f}")
    axes[0].legend(fontsize=8)
    axes[1].semilogy(s, [r["alpha"] for r in steps])
    axes[1].set_title("α (trade-off)")
    axes[2].plot(s, [r["l1"] for r in steps])
    if report["best_step"]:
        axes[2].axvline(report["best_step"], color="green", ls=":", label="kept (σ*)")
        axes[2].legend(fontsize=8)
    axes[2].set_title("‖σ‖₁")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle("UNIT tightening")
    return save_figure(fig, path)


def _plot_bounds(report, path):
    plt = pyplot()
    sites = report["sites"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sites) + 2), 3.6))
    idx = range(len(sites))
    ax.bar([i - 0.2 for i in idx], [s["mean_bound_initial"] for s in sites], 0.4, label="initial (mean + 4·std)")
    ax.bar([i + 0.2 for i in idx], [s["mean_bound_final"] for s in sites], 0.4, label="final (σ*)")
    ax.set_xticks(list(idx), [s["node"] for s in sites], rotation=70, fontsize=7)
    ax.set_ylabel("mean bound")
    ax.legend(fontsize=8)
    ax.set_title("UNIT bounds per activation site")
    return save_figure(fig, path)
