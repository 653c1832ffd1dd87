"""BNA: backdoor mitigation by distribution alignment (Li et al., "Backdoor Mitigation by Correcting the
Distribution of Neural Activations", arXiv:2308.09850, 2023; §4.1-4.2, §5.1, appendices 8, 10).

Detection before mitigation:
1. Reverse-engineer a trigger for every putative target class t
   (`detection="target"`, Neural Cleanse's per-target search, on the
   defender's clean images of all other classes) or for every ordered class
   pair (s, t) (`detection="pairs"`, §4.1 after Xiang et al., on class-s
   images). A trigger is a patch, x' = (1 − m)⊙x + m⊙p with mask m and
   pattern p, fitted by CE(f(x'), t) + λ‖m‖₁ (Neural Cleanse; the paper's
   choice for patch triggers), or an additive perturbation,
   x' = clip(x + δ), fitted by CE + λ‖δ‖₂ (the paper's choice for blended and
   other perturbation triggers). The paper picks the objective by the
   attack's trigger type, which a defender does not know, so per target
   `trigger="auto"` (default) runs both searches and flags a class when
   either flags it (at the price of either search's false positives); per
   pair it searches perturbations, as the paper. λ follows Neural Cleanse's schedule (×1.5
   after `re_patience` successful check windows in a row, ÷1.5^1.5 after as
   many failed ones); the kept trigger is the smallest one whose success rate
   reached `re_success`.
2. MAD anomaly index, one-sided (small triggers are suspicious): per target
   (s = trigger size) index = (median − s)/(1.4826·MAD), flagged above 2
   (Neural Cleanse's rule); per pair (s = 1/size, the paper's statistic)
   index = (s − median)/MAD, flagged above 7 (the paper's 7-MAD rule). By
   default s is taken on a log scale (`statistic="log"`; "linear" is the
   originals'): trigger sizes are scale quantities whose spread across
   classes is multiplicative (on Fashion-MNIST clean classes need masks of
   28 to 100 pixels), and on a log scale the size and its reciprocal give the
   same index, so the rule no longer depends on which of the two the detector
   reports. A trigger that never reached the success rate is never flagged.
   Nothing flagged: the model is returned unchanged and the report says so.
Mitigation, per detected target t:
3. Re-estimate the trigger (of the kind that flagged t most strongly) on the
   images of all detected source classes Ŝ(t). Per-target detection already
   estimated it on every other class, so when Ŝ(t) is all of them that
   trigger is reused.
4. Every BatchNorm becomes h(z) = γ·max(min((z − μ)/σ, ω), v) + β (eq. 4,
   with BN's own affine kept as the paper does when a neuron is followed by
   a BN): μ, σ start at the running statistics, v, ω at the normalised clean
   minimum and maximum; γ, β and every model weight stay fixed. μ, σ, v, ω
   are trained (Adam, lr 0.01, 10 epochs over the triggered clean images of
   Ŝ(t)) to minimise Σ_layers Σ_neurons D(p‖q): p the soft histogram of the
   clean model's BN outputs on the clean images of Ŝ(t), q that of g's on
   the same images with the trigger, bins of width Δb = 0.1 spanning each
   neuron's clean [min, max] over all clean data, τ = 150, D = TV (JS, KL
   options), through the fused `soft_histogram` op. `layers=` names modules
   explicitly: BatchNorms among them are transformed in place, any other
   module gets an h after it with γ, β = its clean std and mean (a BN
   inserted after it, as the paper's footnote 1 allows).
5. Inference (`BNAModel`): ŷ = f(x) unless f(x) is a detected target t;
   then ŷ = g(x|Θ_t), and x is flagged as triggered when the two disagree.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..monitor import PhaseRecorder
from ..ops.soft_histogram import f_divergence, soft_histogram
from ..progress import progress_bar
from .base import (COUNT, EPOCHS, POSITIVE, SEED, CleanData, DefenseResult, choice, config_dict, pyplot, real,
                   register, save_figure, text, validate)

NC_CONSISTENCY = 1.4826  # MAD of a normal sample · 1.4826 ≈ its standard deviation (Neural Cleanse)


@dataclass
class BNAConfig:
    detection: str = "target"  # "target": one trigger per putative target class; "pairs": one per (s, t)
    trigger: str = "auto"  # "patch", "perturbation", "both" (flag with either); auto: both per target, δ per pair
    threshold: float | None = None  # anomaly-index threshold; None: 2 ("target") or 7 ("pairs")
    statistic: str = "log"  # MAD over log trigger sizes ("log") or over the sizes themselves ("linear": NC, paper)
    re_steps: int = 300  # reverse-engineering optimisation steps
    re_batch_size: int = 32  # clean images per step; each is replicated once per putative target
    re_max_images: int = 1024  # replicated images per forward pass (a step accumulates over chunks)
    re_lr: float = 0.1
    re_init_cost: float = 1e-3  # λ₀
    re_cost_multiplier: float = 1.5
    re_check_every: int = 10  # steps per success-rate check window
    re_patience: int = 3  # check windows in a row before λ moves
    re_success: float = 0.99  # a trigger counts once this fraction of its images go to its target
    layers: str = "bn"  # "bn": every BatchNorm; or comma-separated module names or type names
    divergence: str = "tv"  # "tv", "js" or "kl"
    tau: float = 150.0
    bin_width: float = 0.1
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        validate(self, "BNAConfig", BNA_RULES)

    @property
    def trigger_kinds(self) -> list[str]:
        if self.trigger == "auto":
            return ["patch", "perturbation"] if self.detection == "target" else ["perturbation"]
        return ["patch", "perturbation"] if self.trigger == "both" else [self.trigger]

    @property
    def anomaly_threshold(self) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return 2.0 if self.detection == "target" else 7.0


BNA_RULES = {
    "detection": choice("target", "pairs"),
    "trigger": choice("auto", "patch", "perturbation", "both"),
    "threshold": real(low=0, optional=True),  # an anomaly index: flagged above it (0: above the median)
    "statistic": choice("log", "linear"),
    "re_steps": COUNT,
    "re_batch_size": COUNT,
    "re_max_images": COUNT,
    "re_lr": POSITIVE,
    "re_init_cost": POSITIVE,  # λ only ever grows or shrinks by a factor: from 0 it would stay 0
    "re_cost_multiplier": real(above=1),
    "re_check_every": COUNT,
    "re_patience": COUNT,
    "re_success": real(above=0, high=1),  # a success rate
    "layers": text(),  # "bn" or comma-separated module or type names (checked against the model)
    "divergence": choice("tv", "js", "kl"),
    "tau": POSITIVE,
    "bin_width": POSITIVE,
    "epochs": EPOCHS,
    "lr": POSITIVE,
    "batch_size": COUNT,
    "seed": SEED,
}


@contextlib.contextmanager
def frozen_weights(model: nn.Module):
    """The model's parameters get no gradients inside the block (BNA never changes them)."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


# --------------------------------------------------------------------------- detection
def anomaly_index(statistics: torch.Tensor, small_is_anomalous: bool, consistency: float = 1.0) -> torch.Tensor:
    """One-sided MAD anomaly index: deviation from the median towards the suspicious side / (consistency·MAD).

    Values on the other side of the median get negative indices. With MAD = 0 every deviation on the
    suspicious side is infinitely anomalous (+inf) and the median itself scores 0.
    """
    s = statistics.double().flatten()
    median = s.quantile(0.5)  # the mean of the two middle values for an even count, as Neural Cleanse's numpy
    mad = (s - median).abs().quantile(0.5) * consistency
    deviation = (median - s) if small_is_anomalous else (s - median)
    if mad > 0:
        return (deviation / mad).reshape(statistics.shape)
    out = torch.zeros_like(deviation)
    out[deviation > 0] = math.inf
    out[deviation < 0] = -math.inf
    return out.reshape(statistics.shape)


def detection_index(sizes: torch.Tensor, config: BNAConfig) -> torch.Tensor:
    """The anomaly index of each trigger size under the config's mode and statistic (module docstring, step 2)."""
    stat = sizes.clamp_min(1e-12)
    stat = stat.log() if config.statistic == "log" else stat
    if config.detection == "target":
        return anomaly_index(stat, small_is_anomalous=True, consistency=NC_CONSISTENCY)
    # the paper's statistic, the reciprocal of the size: −log size on the log scale
    return anomaly_index(-stat if config.statistic == "log" else 1.0 / stat, small_is_anomalous=False)


class TriggerBank(nn.Module):
    """Jobs j = (target t_j, source classes S_j), one trigger each, optimised together in one batch.

    kind "patch": x' = (1 − m)⊙x + m⊙p, size ‖m‖₁; kind "perturbation": x' = clamp(x + δ, lo, hi), size ‖δ‖₂.
    Masks are tanh-parametrised into [0, 1] and patterns into the images' value range [lo, hi] (Neural
    Cleanse), so inputs normalised other than to [0, 1] work too.
    """

    def __init__(self, kind: str, targets: list[int], sources: list[list[int]], image_shape, seed: int = 0,
                 value_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if kind not in ("patch", "perturbation"):
            raise ValueError(f"unknown trigger kind {kind!r}")
        if not value_range[0] < value_range[1]:
            raise ValueError(f"trigger value range must be increasing, got {value_range}")
        self.kind, self.targets, self.sources = kind, list(targets), [sorted(s) for s in sources]
        self.lo, self.hi = float(value_range[0]), float(value_range[1])
        # member[j, c]: class c is a source of job j (one spare column for classes no job draws from)
        self._member = torch.zeros(len(self.targets), max(max(s, default=0) for s in self.sources) + 2,
                                   dtype=torch.bool)
        for j, s in enumerate(self.sources):
            self._member[j, s] = True
        c, h, w = image_shape
        g = torch.Generator().manual_seed(seed)
        n = len(self.targets)
        if kind == "patch":
            self.mask_raw = nn.Parameter(torch.randn(n, 1, h, w, generator=g) * 0.1 - 2.0)  # mask ≈ 0.02
            self.pattern_raw = nn.Parameter(torch.randn(n, c, h, w, generator=g) * 0.1)
        else:
            self.delta = nn.Parameter(torch.randn(n, c, h, w, generator=g) * 1e-3)

    def mask(self) -> torch.Tensor:
        return (torch.tanh(self.mask_raw) + 1) / 2

    def pattern(self) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * (torch.tanh(self.pattern_raw) + 1) / 2

    def apply(self, x: torch.Tensor, jobs: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) with job index per row."""
        # index_select, not t[jobs]: the backward of advanced indexing accumulates with atomics on CPU, so
        # its sums (and every trigger after them) would change from run to run
        if self.kind == "patch":
            m, p = self.mask().index_select(0, jobs), self.pattern().index_select(0, jobs)
            return (1 - m) * x + m * p
        return (x + self.delta.index_select(0, jobs)).clamp(self.lo, self.hi)

    def sizes(self) -> torch.Tensor:
        if self.kind == "patch":
            return self.mask().flatten(1).sum(1)
        return self.delta.flatten(1).norm(dim=1)

    def job_pairs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, job) for every image row whose class is a source of the job."""
        y = y.clamp(max=self._member.shape[1] - 1)  # classes above every source land in the spare column
        return self._member[:, y].T.nonzero(as_tuple=True)


def _value_range(clean: CleanData) -> tuple[float, float]:
    lo, hi = float(clean.x.min()), float(clean.x.max())
    return (lo, hi) if lo < hi else (lo, lo + 1.0)


def reverse_engineer(model: nn.Module, clean: CleanData, bank: TriggerBank, config: BNAConfig, device="cpu",
                     progress: bool = True, label: str = "BNA reverse-engineer") -> dict:
    """Optimise every job's trigger together; keeps each job's smallest trigger that reached re_success.

    Returns {"size": (jobs,) sizes of the kept triggers, "reached": (jobs,) bool, "success": final rates,
    "cost": final λ per job, "trace": per check window}. The bank holds the kept triggers afterwards.
    """
    with frozen_weights(model):
        return _reverse_engineer(model, clean, bank, config, device, progress, label)


def _reverse_engineer(model, clean, bank, config, device, progress, label) -> dict:
    bank = bank.to(device)
    n_jobs = len(bank.targets)
    targets = torch.tensor(bank.targets, device=device)
    opt = torch.optim.Adam(bank.parameters(), lr=config.re_lr, betas=(0.5, 0.9))
    cost = torch.full((n_jobs,), config.re_init_cost, device=device)
    up = torch.zeros(n_jobs, dtype=torch.long)
    down = torch.zeros(n_jobs, dtype=torch.long)
    best = {k: v.detach().clone() for k, v in bank.state_dict().items()}
    best_size = torch.full((n_jobs,), math.inf)
    best_success = torch.zeros(n_jobs)
    hits, counts = torch.zeros(n_jobs), torch.zeros(n_jobs)
    success = torch.zeros(n_jobs)
    dtype = _dtype_of(model)
    trace = []
    batches = clean.endless_batches(config.re_batch_size, config.seed)
    bar = progress_bar(range(config.re_steps), label, enabled=progress)
    for step in bar:
        x, y = next(batches)
        rows, jobs = bank.job_pairs(y)
        if rows.numel() == 0:
            continue
        x, rows, jobs = x.to(device, dtype), rows.to(device), jobs.to(device)
        n_per_job = torch.bincount(jobs, minlength=n_jobs).clamp_min(1)
        opt.zero_grad(set_to_none=True)
        # Σ_j mean CE_j + λ_j·size_j, accumulated over chunks so memory stays at re_max_images images
        (cost * bank.sizes()).sum().backward()
        for start in range(0, rows.numel(), config.re_max_images):
            r, j = rows[start:start + config.re_max_images], jobs[start:start + config.re_max_images]
            logits = model(bank.apply(x[r], j).to(dtype))
            ce = F.cross_entropy(logits, targets[j], reduction="none")
            (ce / n_per_job[j]).sum().backward()
            with torch.no_grad():
                ok = (logits.argmax(1) == targets[j]).float()
                hits += torch.zeros(n_jobs, device=device).index_add_(0, j, ok).cpu()
        counts += torch.bincount(jobs, minlength=n_jobs).cpu().float()
        opt.step()
        if (step + 1) % config.re_check_every and step + 1 != config.re_steps:
            continue
        # one check window: keep improved triggers, then move λ (Neural Cleanse's schedule)
        # a job that saw no image in this window (pairs mode, rare classes) is neither kept nor moved
        seen = counts > 0
        success = torch.where(seen, hits / counts.clamp_min(1), success)
        with torch.no_grad():
            sizes = bank.sizes().cpu()
            improved = seen & (success >= config.re_success) & (sizes < best_size)
            if improved.any():
                state = bank.state_dict()
                for k in best:
                    best[k][improved.to(best[k].device)] = state[k][improved.to(state[k].device)]
                best_size = torch.where(improved, sizes, best_size)
                best_success = torch.where(improved, success, best_success)
        reached = success >= config.re_success
        up = torch.where(seen, torch.where(reached, up + 1, torch.zeros_like(up)), up)
        down = torch.where(seen, torch.where(reached, torch.zeros_like(down), down + 1), down)
        raise_cost, lower_cost = up >= config.re_patience, down >= config.re_patience
        cost = torch.where(raise_cost.to(device), cost * config.re_cost_multiplier, cost)
        cost = torch.where(lower_cost.to(device), cost / config.re_cost_multiplier ** 1.5, cost)
        up[raise_cost], down[lower_cost] = 0, 0
        trace.append({"step": step + 1, "success": success.tolist(), "size": sizes.tolist(),
                      "cost": cost.cpu().tolist()})
        bar.set_postfix(reached=f"{int(reached.sum())}/{n_jobs}")
        hits.zero_(), counts.zero_()
    reached = torch.isfinite(best_size)
    with torch.no_grad():
        final = {k: v.detach().clone() for k, v in bank.state_dict().items()}
        for k in best:  # jobs that never reached the success rate keep their final trigger
            keep = reached.to(final[k].device)
            final[k][keep] = best[k][keep]
        bank.load_state_dict(final)
        size = bank.sizes().cpu()
    for p in bank.parameters():
        p.grad = None
        p.requires_grad_(False)
    # the success rate reported is the kept trigger's (the last window's for a job that never reached it)
    return {"size": size, "reached": reached, "success": torch.where(reached, best_success, success),
            "cost": cost.cpu(), "trace": trace}


def _json_float(x) -> float | str:
    """Reports are JSON: an infinite anomaly index (MAD = 0) is written as "inf" / "-inf"."""
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _dtype_of(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


# --------------------------------------------------------------------------- the transformation h
class BNATransform(nn.Module):
    """h(z) = γ·max(min((z − μ)/σ, ω), v) + β per channel; μ, σ, v, ω learnable, γ, β fixed buffers."""

    def __init__(self, channels: int, channel_dim: int = 1, eps: float = 1e-5):
        super().__init__()
        self.channels, self.channel_dim, self.eps = channels, channel_dim, eps
        self.mu = nn.Parameter(torch.zeros(channels))
        self.sigma = nn.Parameter(torch.ones(channels))
        self.lower = nn.Parameter(torch.full((channels,), -math.inf))
        self.upper = nn.Parameter(torch.full((channels,), math.inf))
        self.register_buffer("gamma", torch.ones(channels))
        self.register_buffer("beta", torch.zeros(channels))

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.channel_dim % ndim] = -1
        return t.view(shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[self.channel_dim % z.dim()] != self.channels:
            raise ValueError(f"BNATransform for {self.channels} channels got input of shape {tuple(z.shape)}")
        v = lambda t: self._view(t.to(z.dtype), z.dim())  # noqa: E731
        u = (z - v(self.mu)) / v(self.sigma.clamp_min(self.eps))
        u = torch.maximum(torch.minimum(u, v(self.upper)), v(self.lower))
        return u * v(self.gamma) + v(self.beta)

    def extra_repr(self) -> str:
        return f"{self.channels}, channel_dim={self.channel_dim}"


def _channel_dim(ndim: int) -> int:
    return 2 if ndim == 3 else 1  # token tensors (N, L, D) per feature, everything else per dim 1


def find_sites(model: nn.Module, layers: str) -> list[dict]:
    """[{"module": name, "kind": "batchnorm" | "after"}] in module order, from the model's own modules.

    ``layers``: "bn" (every BatchNorm), or comma-separated module names and module type names ("LayerNorm"
    selects every LayerNorm).
    """
    modules = dict(model.named_modules())
    if layers == "bn":
        sites = [{"module": n, "kind": "batchnorm"} for n, m in modules.items()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not sites:
            raise ValueError(f"BNA found no BatchNorm in {type(model).__name__}; name the modules whose outputs "
                             "should be aligned, or their type: --set layers=LayerNorm, or layers=name1,name2 (a "
                             "BN-style transform is inserted after each)")
        return sites
    tokens = [t.strip() for t in layers.split(",") if t.strip()]
    by_type = {}
    for n, m in modules.items():
        if n:
            by_type.setdefault(type(m).__name__, []).append(n)
    missing = [t for t in tokens if t not in modules and t not in by_type]
    if not tokens or missing:
        raise ValueError(f"BNA layers: no module named {', '.join(missing) or repr(layers)} in "
                         f"{type(model).__name__}, nor a module type of that name (use 'bn', module names from "
                         "model.named_modules() or type names such as LayerNorm, comma-separated)")
    chosen = {n for t in tokens for n in ([t] if t in modules else by_type[t])}
    return [{"module": n, "kind": "batchnorm" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "after"}
            for n, m in modules.items() if n in chosen]


class _Sites:
    """Forward hooks that route each site through a transform (and optionally record its output)."""

    def __init__(self, model: nn.Module, sites: list[dict]):
        self.model, self.sites = model, sites
        self.modules = [model.get_submodule(s["module"]) for s in sites]

    @contextlib.contextmanager
    def routed(self, transforms, record: list | None = None):
        handles = []
        for i, (site, module) in enumerate(zip(self.sites, self.modules)):
            def hook(mod, args, output, i=i, kind=site["kind"]):
                z = args[0] if kind == "batchnorm" else output
                out = transforms[i](z) if transforms is not None else output
                if record is not None:  # a clone, so in-place ops later in the forward cannot change it
                    record.append((i, out.clone()))
                return out
            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------- the repaired model
def inference_rule(f_logits: torch.Tensor, g_logits_for, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BNA's test-time rule. g_logits_for(rows, t) gives g(x[rows]|Θ_t) for the rows f sends to t.

    Returns (logits, triggered): f's logits, replaced by g's where f predicts a detected target and g
    disagrees; triggered marks exactly those rows.
    """
    pred = f_logits.argmax(1)
    logits = f_logits.clone()
    triggered = torch.zeros_like(pred, dtype=torch.bool)
    for t in targets:
        rows = (pred == t).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        g = g_logits_for(rows, t)
        changed = g.argmax(1) != t
        logits[rows[changed]] = g[changed].to(logits.dtype)
        triggered[rows[changed]] = True
    return logits, triggered


class BNAModel(nn.Module):
    """f with BNA's test-time rule: forward(x) gives the rule's logits; forward(x, return_flags=True) also
    the per-input "triggered" flags. `g(x, t)` is the aligned classifier g(·|Θ_t)."""

    flags_triggered_inputs = True  # run_defense reports test-set TPR/FPR for such models

    def __init__(self, model: nn.Module, targets: list[int], sites: list[dict], channels: list[int],
                 channel_dims: list[int]):
        super().__init__()
        self.model = model
        self.targets = [int(t) for t in targets]
        self.sites = [dict(s) for s in sites]
        self.channels, self.channel_dims = list(channels), list(channel_dims)
        self.transforms = nn.ModuleDict({
            str(t): nn.ModuleList(BNATransform(c, d) for c, d in zip(channels, channel_dims))
            for t in self.targets})
        self._hooks = _Sites(model, self.sites)

    def config(self) -> dict:
        return {"targets": self.targets, "sites": self.sites, "channels": self.channels,
                "channel_dims": self.channel_dims}

    def g(self, x: torch.Tensor, target: int) -> torch.Tensor:
        with self._hooks.routed(self.transforms[str(target)]):
            return self.model(x)

    def forward(self, x: torch.Tensor, return_flags: bool = False):
        logits, triggered = inference_rule(self.model(x), lambda rows, t: self.g(x[rows], t), self.targets)
        return (logits, triggered) if return_flags else logits


# --------------------------------------------------------------------------- the defense
@register
class BNA:
    name = "bna"
    Config = BNAConfig

    def __init__(self, histogram=soft_histogram):
        # The knob exists for the benchmark's dense eager baseline (bench/bench_bna.py).
        self.histogram = histogram

    def run(self, model: nn.Module, clean: CleanData, config: BNAConfig | None = None, device="cpu",
            progress: bool = True) -> DefenseResult:
        config = config or BNAConfig()
        phases = PhaseRecorder(device)
        model = model.to(device).eval()
        sites = find_sites(model, config.layers)  # refuse an unusable model before the long detection
        with phases.phase("detect"):
            detection = self.detect(model, clean, config, device, progress)
        report = {"defense": self.name, "config": config_dict(config), "clean_samples": len(clean),
                  "detection": detection["report"], "detected_targets": detection["targets"]}
        if not detection["targets"]:
            report["outcome"] = "no backdoor detected: the model is returned unchanged"
            report["phases"] = phases.to_dict()
            plots = {"bna_triggers.png": lambda path: _plot_triggers(detection, clean, path)}
            return DefenseResult(model, report, [], plots)
        wrapped, mitigation = self.mitigate(model, clean, sites, detection, config, phases, device, progress)
        report["outcome"] = f"backdoor detected, target class(es) {detection['targets']}: mitigated"
        report["mitigation"] = mitigation
        report["phases"] = phases.to_dict()
        plots = {"bna_triggers.png": lambda path: _plot_triggers(detection, clean, path),
                 "bna_divergence.png": lambda path: _plot_divergence(mitigation, path)}
        return DefenseResult(wrapped, report, [], plots, wrapper={"class": "BNAModel", "args": wrapped.config()})

    # ----------------------------------------------------------------- detection
    def detect(self, model, clean: CleanData, config: BNAConfig, device="cpu", progress=True) -> dict:
        model.eval()  # triggered batches must not move BN's running statistics
        present = sorted(set(clean.y.tolist()))
        if config.detection == "target":
            targets = list(range(clean.num_classes))
            sources = [[s for s in present if s != t] for t in targets]
        else:
            pairs = [(s, t) for t in range(clean.num_classes) for s in present if s != t]
            targets, sources = [t for _, t in pairs], [[s] for s, _ in pairs]
        banks, by_kind, best = {}, {}, {}  # best[t] = (anomaly index, kind) of t's most anomalous flagged job
        for kind in config.trigger_kinds:
            bank = TriggerBank(kind, targets, sources, tuple(clean.x.shape[1:]), config.seed, _value_range(clean))
            result = reverse_engineer(model, clean, bank, config, device, progress,
                                      label=f"BNA reverse-engineer ({kind})")
            size, reached = result["size"], result["reached"]
            index = detection_index(size, config)
            flagged = (index > config.anomaly_threshold) & reached
            jobs = [{"target": t, "sources": s, "size": float(size[j]), "reached": bool(reached[j]),
                     "success": float(result["success"][j]), "anomaly_index": _json_float(index[j]),
                     "flagged": bool(flagged[j])} for j, (t, s) in enumerate(zip(bank.targets, bank.sources))]
            for j in flagged.nonzero().flatten().tolist():
                t = bank.targets[j]
                if float(index[j]) > best.get(t, (-math.inf, None))[0]:
                    best[t] = (float(index[j]), kind)
            size_name = "‖m‖₁ (mask)" if kind == "patch" else "‖δ‖₂"
            name = size_name if config.detection == "target" else f"1 / {size_name}"
            banks[kind] = bank
            by_kind[kind] = {"statistic": f"log {name}" if config.statistic == "log" else name,
                             "jobs": jobs, "trace": result["trace"]}
        detected = sorted(best)
        # mitigation uses the trigger kind that flagged t most strongly, on all sources flagged with it
        kind_of = {t: best[t][1] for t in detected}
        sources_of = {t: sorted({s for job in by_kind[kind_of[t]]["jobs"] if job["flagged"] and job["target"] == t
                                 for s in job["sources"]}) for t in detected}
        report = {"mode": config.detection, "threshold": config.anomaly_threshold, "triggers": by_kind,
                  "sources": {str(t): s for t, s in sources_of.items()},
                  "trigger_used": {str(t): k for t, k in kind_of.items()}}
        return {"targets": detected, "sources": sources_of, "kinds": kind_of, "banks": banks, "report": report}

    # ----------------------------------------------------------------- mitigation
    def mitigate(self, model, clean: CleanData, sites, detection, config, phases, device, progress):
        with frozen_weights(model.eval()):
            return self._mitigate(model, clean, sites, detection, config, phases, device, progress)

    def _mitigate(self, model, clean: CleanData, sites, detection, config, phases, device, progress):
        hooks = _Sites(model, sites)
        with phases.phase("bins"):
            layout = self._clean_layout(model, hooks, clean, config, device)
        channels = [lo.numel() for lo, _, _ in layout["bins"]]
        channel_dims = layout["channel_dims"]
        wrapped = BNAModel(model, detection["targets"], sites, channels, channel_dims).to(device)
        per_target = {}
        for t in detection["targets"]:
            sources = detection["sources"][t]
            with phases.phase(f"trigger_t{t}"):
                bank, job, reused, reached = self._trigger_for(model, clean, detection, t, sources, config, device,
                                                      progress)
            keep = torch.isin(clean.y, torch.tensor(sources))
            data_t = CleanData(clean.x[keep], clean.y[keep], clean.num_classes)
            transforms = wrapped.transforms[str(t)]
            self._initialise(transforms, hooks, layout, sites, model)
            with phases.phase(f"align_t{t}"):
                aligned = self._align(model, hooks, transforms, layout, data_t, bank, job, config, device,
                                      progress, t)
            trace = aligned["epochs"]
            for p in transforms.parameters():
                p.requires_grad_(False)
            per_target[str(t)] = {"sources": sources, "trigger": detection["kinds"][t],
                                  "trigger_reused_from_detection": reused,
                                  "trigger_size": float(bank.sizes()[job].detach()), "epochs": trace,
                                  "trigger_reached_success": reached,
                                  "divergence_per_layer": {
                                      "original_model": aligned["original"], "initial": trace[0]["per_layer"],
                                      "after": trace[-1]["per_layer"]}}
        mitigation = {"sites": [dict(s, channels=c) for s, c in zip(sites, channels)],
                      "bins_per_site": [int(sum(b)) for _, _, b in layout["bins"]],
                      "targets": per_target}
        return wrapped.eval(), mitigation

    def _trigger_for(self, model, clean, detection, t, sources, config, device, progress):
        kind = detection["kinds"][t]
        bank = detection["banks"][kind]
        for j, (tj, sj) in enumerate(zip(bank.targets, bank.sources)):
            if tj == t and sj == sources:
                return bank, j, True, True
        fresh = TriggerBank(kind, [t], [sources], tuple(clean.x.shape[1:]), config.seed + 1, _value_range(clean))
        result = reverse_engineer(model, clean, fresh, config, device, progress, label=f"BNA trigger for class {t}")
        reached = bool(result["reached"][0])
        if not reached:
            warnings.warn(f"BNA: the trigger re-estimated for class {t} on source classes {sources} never sent "
                          f"{config.re_success:.0%} of their images to {t} (best {float(result['success'][0]):.1%}); "
                          "aligning with it anyway. Raise re_steps, or check the detected sources.", stacklevel=4)
        return fresh, 0, False, reached

    @torch.no_grad()
    def _clean_layout(self, model, hooks: _Sites, clean: CleanData, config, device) -> dict:
        """Per-site clean min/max (bins) and mean/std of the site's input (BN) or output (inserted)."""
        n = len(hooks.sites)
        lo, hi = [None] * n, [None] * n
        z_lo, z_hi, s1, s2, cnt = [None] * n, [None] * n, [0] * n, [0] * n, [0] * n
        dims = [None] * n
        captured = []

        def grabber(i):
            def grab(mod, args, output):  # clones: an in-place op later in the forward (ReLU(inplace=True),
                z = args[0] if hooks.sites[i]["kind"] == "batchnorm" else output  # out += identity) rewrites them
                captured.append((i, z.detach().clone(), output.detach().clone()))
            return grab
        handles = [m.register_forward_hook(grabber(i)) for i, m in enumerate(hooks.modules)]
        try:
            for x, _ in clean.batches(config.batch_size):
                captured.clear()
                model(x.to(device, _dtype_of(model)))
                calls = [i for i, _, _ in captured]
                for i, z, out in captured:
                    cd = 1 if hooks.sites[i]["kind"] == "batchnorm" else _channel_dim(out.dim())
                    if calls.count(i) > 1 or (dims[i] is not None and dims[i] != (cd, out.shape[cd])):
                        raise ValueError(f"BNA site {hooks.sites[i]['module']} is called more than once per "
                                         "forward or changes shape; name other layers with layers=")
                    dims[i] = (cd, out.shape[cd])
                    o = out.movedim(cd, 0).reshape(out.shape[cd], -1).double()
                    zz = z.movedim(cd, 0).reshape(z.shape[cd], -1).double()
                    lo[i] = o.amin(1) if lo[i] is None else torch.minimum(lo[i], o.amin(1))
                    hi[i] = o.amax(1) if hi[i] is None else torch.maximum(hi[i], o.amax(1))
                    z_lo[i] = zz.amin(1) if z_lo[i] is None else torch.minimum(z_lo[i], zz.amin(1))
                    z_hi[i] = zz.amax(1) if z_hi[i] is None else torch.maximum(z_hi[i], zz.amax(1))
                    s1[i] = s1[i] + zz.sum(1)
                    s2[i] = s2[i] + (zz * zz).sum(1)
                    cnt[i] += zz.shape[1]
        finally:
            for h in handles:
                h.remove()
        if any(d is None for d in dims):
            never = [hooks.sites[i]["module"] for i, d in enumerate(dims) if d is None]
            raise ValueError(f"BNA sites never called in the forward pass: {', '.join(never)}")
        bins = []
        for i in range(n):
            m = torch.ceil((hi[i] - lo[i]) / config.bin_width).clamp_min(1)
            bins.append((lo[i].float(), config.bin_width, [int(b) for b in m.tolist()]))
        mean = [s1[i] / cnt[i] for i in range(n)]
        std = [((s2[i] / cnt[i]) - mean[i] ** 2).clamp_min(0).sqrt() for i in range(n)]
        return {"bins": bins, "channel_dims": [d[0] for d in dims], "z_min": z_lo, "z_max": z_hi,
                "mean": mean, "std": std}

    @torch.no_grad()
    def _initialise(self, transforms, hooks: _Sites, layout, sites, model):
        """μ, σ from BN's running statistics (or the clean mean/std), γ, β = BN affine (or that std/mean),
        v, ω = the normalised clean min/max, so g starts equal to f on the clean range."""
        for i, (site, module, h) in enumerate(zip(sites, hooks.modules, transforms)):
            dev = h.mu.device
            if site["kind"] == "batchnorm" and module.running_mean is not None:  # what eval-mode BN normalises by
                mu, sigma = module.running_mean.double(), (module.running_var.double() + module.eps).sqrt()
            else:
                mu, sigma = layout["mean"][i], layout["std"][i].clamp_min(1e-5)
            if site["kind"] == "batchnorm":
                gamma = module.weight.double() if module.affine else torch.ones_like(mu)
                beta = module.bias.double() if module.affine else torch.zeros_like(mu)
            else:
                gamma, beta = sigma.clone(), mu.clone()
            h.mu.copy_(mu.to(dev)), h.sigma.copy_(sigma.to(dev))
            h.gamma.copy_(gamma.to(dev)), h.beta.copy_(beta.to(dev))
            zmin, zmax = layout["z_min"][i].to(dev), layout["z_max"][i].to(dev)
            h.lower.copy_((zmin - mu.to(dev)) / sigma.to(dev))
            h.upper.copy_((zmax - mu.to(dev)) / sigma.to(dev))

    def _histograms(self, outs, layout, config):
        bins = layout["bins"]
        return {i: self.histogram(z, bins[i][0].to(z.device), bins[i][1], bins[i][2], config.tau,
                                  layout["channel_dims"][i]) for i, z in outs}

    def _forward_histograms(self, model, hooks, layout, x, config, device, transforms=None, trigger=None) -> dict:
        """{site: histogram} of one batch through g with `transforms` (f when None), with `trigger` = (bank, job)
        applied to the images when given."""
        dtype = _dtype_of(model)
        x = x.to(device, dtype)
        if trigger is not None:
            x = trigger[0].apply(x, torch.full((x.shape[0],), trigger[1], device=device)).to(dtype)
        record = []
        with hooks.routed(transforms, record):
            model(x)
        return self._histograms(record, layout, config)

    @torch.no_grad()
    def _histograms_over(self, model, hooks, layout, data: CleanData, config, device, transforms=None,
                         trigger=None) -> list[torch.Tensor]:
        """Per-site histograms over all of `data` (batch histograms weighted by batch size)."""
        sums, total = [None] * len(hooks.sites), 0
        for x, _ in data.batches(config.batch_size):
            hists = self._forward_histograms(model, hooks, layout, x, config, device, transforms, trigger)
            for i, h in hists.items():
                sums[i] = h * x.shape[0] if sums[i] is None else sums[i] + h * x.shape[0]
            total += x.shape[0]
        return [s / total for s in sums]

    def _align(self, model, hooks, transforms, layout, data, bank, job, config, device, progress, t):
        p = self._histograms_over(model, hooks, layout, data, config, device)
        params = [q for h in transforms for q in (h.mu, h.sigma, h.lower, h.upper)]
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)

        def measure(with_transforms=True) -> list[float]:
            q = self._histograms_over(model, hooks, layout, data, config, device,
                                      transforms if with_transforms else None, (bank, job))
            return [float(f_divergence(p[i], q[i], config.divergence).sum()) for i in range(len(q))]

        original = measure(with_transforms=False)  # f itself on triggered images
        trace = [{"epoch": 0, "per_layer": measure()}]  # g at its initial Θ (v, ω already clip)
        trace[0]["total"] = sum(trace[0]["per_layer"])
        bar = progress_bar(range(config.epochs), f"BNA align (target {t})", enabled=progress)
        for epoch in bar:
            for x, _ in data.batches(config.batch_size, shuffle=True, seed=config.seed + epoch):
                q = self._forward_histograms(model, hooks, layout, x, config, device, transforms, (bank, job))
                loss = sum(f_divergence(p[i], q[i], config.divergence).sum() for i in sorted(q))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            per_layer = measure()
            trace.append({"epoch": epoch + 1, "per_layer": per_layer, "total": sum(per_layer)})
            bar.set_postfix(divergence=f"{trace[-1]['total']:.3f}")
        opt.zero_grad(set_to_none=True)
        return {"original": original, "epochs": trace}


# --------------------------------------------------------------------------- plots
def _plot_triggers(detection, clean, path):
    plt = pyplot()
    kinds = list(detection["banks"])
    rows = []
    for kind in kinds:
        bank, jobs = detection["banks"][kind], detection["report"]["triggers"][kind]["jobs"]
        with torch.no_grad():
            if kind == "patch":
                images = (bank.mask() * (bank.pattern() - bank.lo) / (bank.hi - bank.lo)).cpu()
            else:
                d = bank.delta.detach().cpu()
                images = (d - d.amin()) / (d.amax() - d.amin()).clamp_min(1e-12)
        best = {}  # per target, its most anomalous job (there are several in pairs mode)
        for j, job in enumerate(jobs):
            t = job["target"]
            if t not in best or float(job["anomaly_index"]) > float(jobs[best[t]]["anomaly_index"]):
                best[t] = j
        rows.append((kind, [(images[best[t]], jobs[best[t]]) for t in sorted(best)]))
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1, 2.4 * len(rows)), squeeze=False)
    for r, (kind, cells) in enumerate(rows):
        for ax, (img, job) in zip(axes[r], cells):
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{kind[:5]} t={job['target']}\nidx {float(job['anomaly_index']):.1f}", fontsize=8,
                         color="red" if job["flagged"] else "black")
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle("BNA reverse-engineered triggers (patch: mask ⊙ pattern; perturbation: δ rescaled); "
                 "red = flagged", fontsize=9)
    return save_figure(fig, path)


def _plot_divergence(mitigation, path):
    plt = pyplot()
    targets = mitigation["targets"]
    names = [s["module"] for s in mitigation["sites"]]
    fig, axes = plt.subplots(1, len(targets), figsize=(max(6, 0.35 * len(names) + 2) * len(targets), 3.8),
                             squeeze=False)
    for ax, (t, info) in zip(axes[0], targets.items()):
        idx = range(len(names))
        ax.bar([i - 0.2 for i in idx], info["divergence_per_layer"]["original_model"], 0.4,
               label="before alignment (f)")
        ax.bar([i + 0.2 for i in idx], info["divergence_per_layer"]["after"], 0.4, label="after alignment")
        ax.set_xticks(list(idx), names, rotation=70, fontsize=7)
        ax.set_ylabel("Σ over neurons of D(p‖q)")
        ax.set_title(f"target {t}: clean vs triggered activations per layer", fontsize=9)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
