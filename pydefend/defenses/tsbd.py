"""TSBD: two-stage backdoor defense (Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities
based on Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024, arXiv:2405.20291; §3.4, Algorithms 1-2,
appendix C).

Stage 1, NWC-based backdoor re-initialisation:
  a. Clean unlearning: on a copy of the model, gradient *ascent* on the
     cross-entropy of the clean data (SGD lr 1e-4, momentum 0.9) until the
     copy's clean accuracy is ≤ 10 %. The accuracy is checked after every
     mini-batch, as Algorithm 1 (``unlearn_check="epoch"``: after every
     epoch, as the authors' code), over the whole clean data in eval mode;
     the check stops reading as soon as more than 10 % of the samples are
     right, so while the model is still accurate it costs about one batch.
     The ascent runs in train mode (BatchNorm on batch statistics, running
     statistics updated on the copy), as the authors' code. A cap on epochs
     ends it with a warning if the threshold is never reached.
  b. Neuron weight change NWC_k = Σ_i |θ_ul[k, i] − θ_bd[k, i]| per output
     neuron of the chosen layers (default: convolutions; ``layers="linear"``
     or ``"conv+linear"`` for transformers), one fused op call
     (pydefend.ops.neuron_l1).
  c. Zero re-initialisation, in place on the backdoored weights: of the top
     n = 15 % neurons by NWC (global over the chosen layers), zero the
     m = 70 % sub-weights with the largest |Δθ|, pooled over all selected
     neurons (``selection="global"``, the paper's V3 and the authors' code) or
     per neuron (``"per_neuron"``, the paper's V2). Biases are kept.
  The unlearned copy is freed here: it is the only second copy of the weights.

Stage 2, activeness-aware fine-tuning (Algorithm 2), 20 epochs over the clean
data, SGD lr 0.01 with momentum 0.9 (the authors' code; the paper names only
the learning rate), every parameter trained, train mode:
    g1 = ∇L(θ);  θ' = θ + r·g1/‖g1‖ (r = 0.05);  g2 = ∇L(θ');
    g = (1 − α)·g1 + α·g2 (α = 0.7);  θ ← SGD step with g.
‖g1‖ is the norm of the whole gradient (the paper); ``perturb_norm=
"per_tensor"`` normalises each tensor on its own (the authors' code).
θ is perturbed in place and copied back bit-exactly from a buffer allocated
once (the authors deep-copy the model every batch). g1 is not stored apart:
it is scaled by (1 − α) in ``.grad`` and the backward of α·L(θ') adds α·g2 on
top. BatchNorm running statistics are updated by the forward at θ only; the
forward at θ' uses batch statistics and its running-statistics update is
undone (the authors' per-batch deep copy discards it too).

The model is repaired in place by default (``inplace=False`` repairs a copy,
one more copy of the weights). `TSBDConfig.official()` gives the authors'
code: per-tensor normalisation, the stop check per epoch, 21 fine-tuning
epochs (both use the authors' cap of 1,000 unlearning epochs). The authors
also skip ResNet shortcut convolutions by attribute name; pydefend uses
every layer of the chosen types.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ..augment import AUGMENTATIONS, augmented
from ..monitor import PhaseRecorder
from ..reproducible import thread_count_independent
from ..ops.neuron_l1 import CONV_TYPES, neuron_l1_change, select_and_zero
from ..progress import progress_bar
from .base import (COUNT, EPOCHS, FRACTION, MOMENTUM, NONNEGATIVE, POSITIVE, SEED, CleanData,
                   DefenseResult, accuracy, choice, config_dict, flag, preset, pyplot, register, save_figure,
                   validate)

LAYER_TYPES = {"conv": CONV_TYPES, "linear": (nn.Linear,), "conv+linear": CONV_TYPES + (nn.Linear,)}


@dataclass
class TSBDConfig:
    unlearn_lr: float = 1e-4
    unlearn_momentum: float = 0.9
    unlearn_threshold: float = 0.10  # stop once clean accuracy <= this
    unlearn_check: str = "batch"  # "batch" (Algorithm 1) or "epoch" (authors' code)
    max_unlearn_epochs: int = 1000  # the authors' cap
    layers: str = "conv"  # "conv", "linear" or "conv+linear"
    neuron_ratio: float = 0.15  # n
    weight_ratio: float = 0.70  # m
    selection: str = "global"  # "global" (paper V3, authors' code) or "per_neuron" (paper V2)
    finetune_epochs: int = 20
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    # "Other settings ... following the default BackdoorBench configuration" (paper §5.1): its fine-tuning
    # augments (random crop, and a horizontal flip on CIFAR), decays weights by 5e-4 and anneals lr on a cosine.
    finetune_augment: str = "auto"  # "auto" (crop from 16×16 up), "none", "crop" or "crop+flip"
    finetune_weight_decay: float = 5e-4
    finetune_schedule: str = "cosine"  # "cosine" or "constant"
    r: float = 0.05
    alpha: float = 0.7
    perturb_norm: str = "global"  # "global" (paper) or "per_tensor" (authors' code)
    batch_size: int = 256
    inplace: bool = True
    seed: int = 0

    def __post_init__(self):
        validate(self, "TSBDConfig", TSBD_RULES)

    @preset
    def official(cls, **overrides) -> "TSBDConfig":
        """The settings of the authors' released code."""
        base = dict(perturb_norm="per_tensor", unlearn_check="epoch", finetune_epochs=21)
        return cls(**{**base, **overrides})


TSBD_RULES = {
    "unlearn_lr": POSITIVE,  # gradient ascent must move
    "unlearn_momentum": MOMENTUM,
    "unlearn_threshold": FRACTION,  # an accuracy
    "unlearn_check": choice("batch", "epoch"),
    "max_unlearn_epochs": COUNT,
    "layers": choice(*LAYER_TYPES),
    "neuron_ratio": FRACTION,  # n
    "weight_ratio": FRACTION,  # m
    "selection": choice("global", "per_neuron"),
    "finetune_epochs": EPOCHS,
    "finetune_lr": NONNEGATIVE,
    "finetune_momentum": MOMENTUM,
    "finetune_augment": choice(*AUGMENTATIONS),
    "finetune_weight_decay": NONNEGATIVE,
    "finetune_schedule": choice("cosine", "constant"),
    "r": NONNEGATIVE,  # the perturbation radius
    "alpha": FRACTION,  # the weight of g2 in (1 − α)·g1 + α·g2
    "perturb_norm": choice("global", "per_tensor"),
    "batch_size": COUNT,
    "inplace": flag,
    "seed": SEED,
}


class ActivenessAwareStep:
    """One step of Algorithm 2 on `model` with `optimizer`; weights perturbed in place and restored exactly.

    Allocates once, on construction: one buffer per parameter (the restore point) and copies of the
    normalisation layers' running statistics.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, r: float, alpha: float,
                 perturb_norm: str = "global"):
        self.model, self.optimizer = model, optimizer
        self.r, self.alpha, self.perturb_norm = r, alpha, perturb_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        perturbs = alpha > 0 and r > 0
        self.saved = [torch.empty_like(p) for p in self.params] if perturbs else []
        self.stats = [b for m in model.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
        self.saved_stats = [torch.empty_like(b) for b in self.stats] if perturbs else []

    def _scales(self, grads) -> list[float]:
        norms = torch.stack(torch._foreach_norm(grads)).float()
        if self.perturb_norm == "global":
            norms = torch.linalg.vector_norm(norms).expand(len(grads))
        norms = norms.tolist()  # one device sync per step
        if not all(math.isfinite(n) for n in norms):
            raise FloatingPointError("TSBD fine-tuning: the gradient is not finite; lower finetune_lr")
        return [self.r / n if n > 0 else 0.0 for n in norms]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Returns the loss at θ and the number of correct predictions at θ (train mode)."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if self.saved:
            live = [(p, s) for p, s in zip(self.params, self.saved) if p.grad is not None]
            params, saved = [p for p, _ in live], [s for _, s in live]
            grads = [p.grad for p in params]
            with torch.no_grad():
                torch._foreach_copy_(saved, params)
                if self.stats:  # BatchNorm running statistics; a model without BatchNorm has none
                    torch._foreach_copy_(self.saved_stats, self.stats)
                for p, g, scale in zip(params, grads, self._scales(grads)):
                    p.add_(g, alpha=scale)
                torch._foreach_mul_(grads, 1.0 - self.alpha)
            (self.alpha * F.cross_entropy(self.model(x), y)).backward()  # .grad = (1 − α)·g1 + α·g2
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
                if self.stats:
                    torch._foreach_copy_(self.stats, self.saved_stats)
        self.optimizer.step()
        return float(loss.detach()), int((out.detach().argmax(1) == y).sum())


def _chosen_layers(model: nn.Module, layer_types) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, layer_types) and getattr(m, "weight", None) is not None]


@register
class TSBD:
    name = "tsbd"
    Config = TSBDConfig
    step_class = ActivenessAwareStep

    def run(self, model: nn.Module, clean: CleanData, config: TSBDConfig | None = None, device="cpu",
            progress: bool = True) -> DefenseResult:
        config = config or TSBDConfig()
        phases = PhaseRecorder(device)
        model = model.to(device)
        if not config.inplace:
            model = copy.deepcopy(model)
        layer_types = LAYER_TYPES[config.layers]
        layers = _chosen_layers(model, layer_types)
        if not layers:
            hint = "; try layers='linear'" if config.layers == "conv" and _chosen_layers(model, (nn.Linear,)) else ""
            raise ValueError(f"TSBD found no {config.layers} layer with weights in this model{hint}")
        flags = [p.requires_grad for p in model.parameters()]
        acc_original = accuracy(model.eval(), clean, device=device)

        with phases.phase("unlearn"):
            unlearned = copy.deepcopy(model)
            with thread_count_independent(unlearned):
                unlearn = self._unlearn(unlearned, clean, config, device, progress)

        with phases.phase("reinitialise"):
            names = [name for name, _ in layers]
            nwc, records = self._reinitialise(model, unlearned, config, layer_types)
            del unlearned
            acc_reinit = accuracy(model.eval(), clean, device=device)

        with phases.phase("finetune"), thread_count_independent(model):
            finetune = self._finetune(model, clean, config, device, progress)
        model.eval()
        for p, flag in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(flag)

        by_layer = {name: [] for name in names}
        for rec in records:
            by_layer[rec.layer].append(rec)
        threshold = min((rec.nwc for rec in records), default=None)
        report = {
            "defense": self.name, "config": config_dict(config), "clean_samples": len(clean),
            "clean_accuracy": {"original": acc_original, "unlearned": unlearn["accuracy"],
                               "reinitialised": acc_reinit, "final": finetune["accuracy"]},
            "unlearning": {k: v for k, v in unlearn.items() if k != "accuracy"},
            "nwc_threshold": threshold,
            "zeroed_sub_weights": sum(rec.zeroed for rec in records),
            "layers": [{"name": name, "type": type(m).__name__, "neurons": int(v.numel()),
                        "nwc_mean": float(v.mean()) if v.numel() else 0.0,
                        "nwc_max": float(v.max()) if v.numel() else 0.0,
                        "selected_neurons": sorted(rec.neuron for rec in by_layer[name]),
                        "zeroed_neurons": sorted(rec.neuron for rec in by_layer[name] if rec.zeroed),
                        "zeroed_sub_weights": sum(rec.zeroed for rec in by_layer[name])}
                       for (name, m), v in zip(layers, nwc)],
            "finetune": finetune["epochs"],
            "phases": phases.to_dict(),
        }
        plots = {"tsbd_nwc.png": lambda path: _plot_nwc(names, nwc, threshold, config, path),
                 "tsbd_training.png": lambda path: _plot_training(report, config, path)}
        return DefenseResult(model, report, [], plots)

    # ------------------------------------------------------------------ stage 1
    def _unlearn(self, model, clean, config, device, progress) -> dict:
        model.train()
        params = [p for p in model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=config.unlearn_lr, momentum=config.unlearn_momentum)
        reached, acc = self._accuracy_at_most(model, clean, config.unlearn_threshold, device)
        if reached:
            raise ValueError(f"the model's clean accuracy is already {acc:.3f} <= unlearn_threshold "
                             f"{config.unlearn_threshold}: there is nothing to unlearn, so NWC cannot rank neurons")
        steps, trace = 0, []
        bar = progress_bar(range(config.max_unlearn_epochs), "TSBD unlearn", enabled=progress)
        for epoch in bar:
            for x, y in clean.batches(config.batch_size, shuffle=True, seed=config.seed + epoch):
                if x.shape[0] < 2:  # BatchNorm in train mode cannot normalise a single sample
                    continue
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                (-loss).backward()
                opt.step()
                steps += 1
                trace.append({"step": steps, "loss": float(loss.detach()),
                              "batch_accuracy": float((out.detach().argmax(1) == y).float().mean())})
                if config.unlearn_check == "batch":
                    reached, acc = self._accuracy_at_most(model, clean, config.unlearn_threshold, device)
                    if reached:
                        break
            if config.unlearn_check == "epoch":
                reached, acc = self._accuracy_at_most(model, clean, config.unlearn_threshold, device)
            bar.set_postfix(loss=f"{trace[-1]['loss']:.2f}" if trace else "-")
            if reached:
                break
        if not reached:
            acc = accuracy(model.eval(), clean, device=device)
            warnings.warn(f"TSBD: clean unlearning did not bring the clean accuracy to {config.unlearn_threshold} "
                          f"within max_unlearn_epochs={config.max_unlearn_epochs} (it is {acc:.3f}); NWC is taken "
                          "from the partly unlearned model. Raise max_unlearn_epochs or unlearn_lr.", stacklevel=3)
        for p in params:
            p.grad = None
        return {"reached": reached, "accuracy": acc, "steps": steps, "epochs": epoch + 1, "trace": trace}

    @torch.no_grad()
    def _accuracy_at_most(self, model, clean, threshold, device) -> tuple[bool, float]:
        """(accuracy <= threshold, accuracy) in eval mode; stops early once the answer is "no" (the accuracy
        returned is then a lower bound)."""
        was_training = model.training
        model.eval()
        limit, correct = threshold * len(clean), 0
        for x, y in clean.batches(64):  # small chunks: an early "no" reads few samples
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            if correct > limit:
                break
        model.train(was_training)
        return correct <= limit, correct / len(clean)

    def _reinitialise(self, model, unlearned, config, layer_types):
        """(NWC per chosen layer, on the CPU; select_and_zero's records). NWC is read before the zeroing; the
        selection reads it again inside the op (one more pass over both copies, no extra memory)."""
        nwc = neuron_l1_change([m.weight.detach() for _, m in _chosen_layers(model, layer_types)],
                               [m.weight.detach() for _, m in _chosen_layers(unlearned, layer_types)])
        records = select_and_zero(model, unlearned, n=config.neuron_ratio, m=config.weight_ratio,
                                  mode=config.selection, layer_types=layer_types)
        return [v.cpu() for v in nwc], records

    # ------------------------------------------------------------------ stage 2
    def _finetune(self, model, clean, config, device, progress) -> dict:
        model.train()
        params = [p for p in model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=config.finetune_lr, momentum=config.finetune_momentum,
                              weight_decay=config.finetune_weight_decay)
        schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.finetune_epochs))
                    if config.finetune_schedule == "cosine" else None)
        step = self.step_class(model, opt, config.r, config.alpha, config.perturb_norm)
        generator = torch.Generator().manual_seed(config.seed)
        epochs = []
        bar = progress_bar(range(config.finetune_epochs), "TSBD fine-tune", enabled=progress)
        for epoch in bar:
            total_loss, correct, seen = 0.0, 0, 0
            batches = clean.batches(config.batch_size, shuffle=True, seed=config.seed + 10_000 + epoch)
            for x, y in augmented(batches, config.finetune_augment, generator):
                if x.shape[0] < 2:  # BatchNorm in train mode cannot normalise a single sample
                    continue
                loss, right = step(x.to(device), y.to(device))
                total_loss += loss * x.shape[0]
                correct += right
                seen += x.shape[0]
            epochs.append({"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                           "train_accuracy": correct / max(seen, 1), "lr": opt.param_groups[0]["lr"]})
            if schedule is not None:
                schedule.step()
            bar.set_postfix(loss=f"{epochs[-1]['loss']:.3f}", acc=f"{epochs[-1]['train_accuracy']:.3f}")
        del step, opt
        return {"epochs": epochs, "accuracy": accuracy(model.eval(), clean, device=device)}


def _plot_nwc(names, nwc, threshold, config, path):
    plt = pyplot()
    values = torch.cat(nwc).double()
    if values.numel() == 0:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
    bins = torch.linspace(0, float(values.max()) or 1.0, 61).tolist()
    axes[0].hist(values.tolist(), bins=bins, color="tab:blue", label="all neurons")
    if threshold is not None:
        axes[0].hist(values[values >= threshold].tolist(), bins=bins, color="tab:red",
                     label=f"top {100 * config.neuron_ratio:.0f} % (re-initialised)")
        axes[0].axvline(threshold, color="red", ls="--")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("NWC (L1 weight change of a neuron)")
    axes[0].set_ylabel("neurons")
    axes[0].legend(fontsize=8)
    for i, v in enumerate(nwc):
        v = v.double()
        jitter = (torch.rand(v.numel(), generator=torch.Generator().manual_seed(i)) - 0.5) * 0.6
        chosen = v >= threshold if threshold is not None else torch.zeros_like(v, dtype=torch.bool)
        axes[1].scatter((i + jitter[~chosen]).tolist(), v[~chosen].tolist(), s=4, color="tab:blue")
        axes[1].scatter((i + jitter[chosen]).tolist(), v[chosen].tolist(), s=6, color="tab:red")
    axes[1].set_xticks(range(len(names)), names, rotation=70, fontsize=6)
    axes[1].set_ylabel("NWC")
    axes[1].set_title("per layer (red: selected)", fontsize=9)
    fig.suptitle("TSBD neuron weight change after clean unlearning")
    return save_figure(fig, path)


def _plot_training(report, config, path):
    plt = pyplot()
    trace, epochs = report["unlearning"]["trace"], report["finetune"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    if trace:
        axes[0].plot([t["step"] for t in trace], [t["batch_accuracy"] for t in trace], label="batch accuracy")
        axes[0].axhline(config.unlearn_threshold, color="red", ls="--", label="stop threshold")
        twin = axes[0].twinx()
        twin.plot([t["step"] for t in trace], [t["loss"] for t in trace], color="tab:orange")
        twin.set_ylabel("CE loss (ascended)", color="tab:orange")
        axes[0].legend(fontsize=8)
    axes[0].set_xlabel("unlearning step")
    axes[0].set_title("stage 1: clean unlearning", fontsize=9)
    if epochs:
        axes[1].plot([e["epoch"] for e in epochs], [e["train_accuracy"] for e in epochs], label="train accuracy")
        twin = axes[1].twinx()
        twin.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], color="tab:orange")
        twin.set_ylabel("CE loss", color="tab:orange")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("fine-tuning epoch")
    axes[1].set_title("stage 2: activeness-aware fine-tuning", fontsize=9)
    return save_figure(fig, path)
