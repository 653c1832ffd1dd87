"""UniBP: BatchNorm-affine pruning by rectification Fisher ("UniBP: Toward Universal Backdoor
Purification via Fine-tuning", anonymous submission under double-blind review; §3.3, eqs. 2–6).

1. Reset (θ* → θ′): every BatchNorm affine pair becomes (γ, β) = (1, 0).
2. Rectify θ′ on the clean data with  L = CE + log L_BN  (eq. 2), where
   L_BN = mean over norm layers of ‖μ̂ − μ*‖₂ + λ‖v̂ − v*‖₂ (λ = 0.05): μ̂, v̂ are the current
   mini-batch's per-channel mean and (unbiased) variance of the layer's input, μ*, v* the
   backdoored model's running statistics. While rectifying, the diagonal empirical Fisher of the
   affine parameters (eq. 3) is accumulated by the fused op (`pydefend.ops.diag_fisher.DiagFisher`):
   no per-sample gradient is ever materialised.
3. Mask (eq. 4): the top-K affine coordinates by Fisher score.
4. Prune (eq. 5): those coordinates of the *backdoored* model θ* are set to N(0, σ²) noise.
5. Fine-tune (eq. 6) with CE, every parameter trainable except the masked coordinates, whose
   gradients are zeroed (and whose values are re-written after each step, so weight decay cannot
   move them either: they end exactly as set). SGD momentum 0.9, lr 0.002, 20 epochs (appendix A.3).

Choices where the paper is silent or ambiguous (each is a `UniBPConfig` option):

* K (`k`, `ratio`, `ratio_of`). Eq. 4 defines K = ⌊r·|Θ_BN|⌋; Fig. 8's stable band is written
  "K ∈ [0.010, 0.070]×10⁻³". As a fraction of |Θ_BN| that is < 1 coordinate of PreAct-ResNet-18
  (|Θ_BN| = 7,808), so it cannot be meant literally. Read as a fraction of *all* parameters
  (11.2 M) it is 112–782 coordinates = 1.4–10 % of Θ_BN; read with "×10⁻³" as a typo it is
  r ∈ [0.01, 0.07] of Θ_BN = 78–547 coordinates. Both readings agree within 1.4× on the paper's
  model. Default: r = 0.03 of Θ_BN (inside the band under both readings); `ratio_of="all"` takes
  the ratio of all parameters instead (e.g. ratio=0.03e-3), `k` sets a count. At least one
  coordinate is masked whenever the ratio is > 0.
* Which coordinates: γ and β together (eq. 4, Θ_BN = {γ, β}); `mask_params="weight"` masks γ only
  (appendix A.4 describes gates on γ).
* Which model is pruned: the backdoored θ* (issue, eq. 5 applied to "the BN affine parameters");
  `base="rectified"` prunes the rectified θ′ instead.
* "Small Gaussian noise": σ = `noise_std` = 0.01; 0 gives the hard pruning of eq. 6's M ⊙ θ^u.
* Rectification length: not given. `rectify_epochs` = 5 epochs of SGD (momentum 0.9, lr 0.002,
  all of θ′ trainable, `rectify_params="norm"` trains the affine only). §3.3 computes the FIM
  "while the initialized model is trained with rectification": the Fisher is averaged over every
  rectification step (`fisher_epochs=None`); `fisher_epochs=1` takes only the last pass over D_ft
  (eq. 3 read as the Fisher of the rectified θ′). On Fashion-MNIST BadNets the whole trajectory
  ranks the backdoor channels better: pruning the top 3 % left ASR 29 % vs 79 % with the last epoch.
* Per-sample gradient of a batch-level loss: in train mode samples are coupled by the batch
  statistics and L_BN is a function of the whole batch. A sample's gradient is its term in the
  batch gradient (the gradient w.r.t. a copy of the affine parameters used only by that sample),
  scaled by the batch size: the per-sample loss is ℓ_n = CE_n + log L_BN, L = mean_n ℓ_n.
  `VmapFisher` computes exactly this with torch.func.vmap(grad) (quadratic in the batch: the test
  oracle and the benchmark baseline).
* v̂ is the unbiased batch variance (PyTorch's running_var is updated with the unbiased one).
  log L_BN is taken of L_BN + 1e-12.
* Fine-tuning weight decay is not given: 0.

LayerNorm variant (beyond the paper): the same procedure on LayerNorm affine parameters. LN has
no running statistics, so the reference μ*, v* are the per-feature mean and unbiased variance of
the LN input over all clean samples and token positions, computed once from the backdoored model
(eval mode); μ̂, v̂ are the same statistics over the current mini-batch. BatchNorm layers without
running statistics use the same clean-data reference. A model may mix both kinds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import AUGMENTATIONS, augmented
from ..monitor import PhaseRecorder
from ..ops.diag_fisher import DiagFisher
from ..reproducible import thread_count_independent
from ..progress import progress_bar
from .base import (COUNT, EPOCHS, FRACTION, MOMENTUM, NONNEGATIVE, POSITIVE, SEED, CleanData,
                   DefenseResult, accuracy, choice, config_dict, integer, pyplot, real, register,
                   save_figure, validate)

_BN = nn.modules.batchnorm._BatchNorm
_NORMS = (_BN, nn.LayerNorm)


@dataclass
class UniBPConfig:
    ratio: float = 0.03  # K = max(1, ⌊ratio · base⌋), base = |Θ_BN| (ratio_of="affine") or all parameters
    ratio_of: str = "affine"  # "affine" (eq. 4) or "all" (Fig. 8 read as a fraction of all parameters)
    k: int | None = None  # K as a count; overrides ratio
    mask_params: str = "affine"  # "affine": γ and β (eq. 4); "weight": γ only (appendix A.4)
    base: str = "backdoored"  # prune θ* ("backdoored") or the rectified θ′ ("rectified")
    noise_std: float = 0.01  # σ of the noise written into masked coordinates (0: hard zero)
    reset_weight: float = 1.0  # γ0
    reset_bias: float = 0.0  # β0
    var_weight: float = 0.05  # λ in L_BN
    rectify_epochs: int = 5
    fisher_epochs: int | None = None  # last rectification epochs the Fisher averages over (None: all)
    rectify_lr: float = 0.002
    rectify_params: str = "all"  # train all of θ′ ("all") or only the norm affine ("norm")
    epochs: int = 20  # masked-gradient fine-tuning
    # appendix A.5: "standard data augmentation (random horizontal flip and random crop)"; flips only where
    # they keep labels (not digits or text), so the default crops (images from 16×16 up)
    finetune_augment: str = "auto"  # "auto" (crop from 16×16 up), "none", "crop" or "crop+flip"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        validate(self, "UniBPConfig", UNIBP_RULES)
        if self.fisher_epochs is not None and self.fisher_epochs > self.rectify_epochs:
            raise ValueError(f"UniBPConfig.fisher_epochs must be <= rectify_epochs ({self.rectify_epochs}): the Fisher "
                             f"is taken while rectifying, got {self.fisher_epochs}")


UNIBP_RULES = {
    "ratio": FRACTION,  # of |Θ_BN| or of all parameters
    "ratio_of": choice("affine", "all"),
    "k": integer(0, optional=True),
    "mask_params": choice("affine", "weight"),
    "base": choice("backdoored", "rectified"),
    "noise_std": NONNEGATIVE,
    "reset_weight": real(),  # γ0: any finite value
    "reset_bias": real(),  # β0: any finite value
    "var_weight": NONNEGATIVE,  # λ
    "rectify_epochs": COUNT,  # the Fisher needs at least one pass
    "fisher_epochs": integer(1, optional=True),  # and <= rectify_epochs (checked in __post_init__)
    "rectify_lr": POSITIVE,
    "rectify_params": choice("all", "norm"),
    "epochs": EPOCHS,
    "finetune_augment": choice(*AUGMENTATIONS),
    "lr": POSITIVE,
    "momentum": MOMENTUM,
    "weight_decay": NONNEGATIVE,
    "batch_size": COUNT,
    "seed": SEED,
}


# --------------------------------------------------------------------------- statistics
def _feature_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as (rows, features): BN channels are dim 1, LN features its normalized dims."""
    if isinstance(module, _BN):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, math.prod(module.normalized_shape))


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _NORMS)]


def _affine(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and getattr(module, "bias", None) is not None


@torch.no_grad()
def reference_statistics(model: nn.Module, clean: CleanData, batch_size: int, device) -> list[tuple]:
    """(μ*, v*) per norm layer of `model`: BN running statistics, else clean-data input statistics."""
    layers = _norm_layers(model)
    sums: dict[int, list] = {}
    need = [i for i, (_, m) in enumerate(layers) if not (isinstance(m, _BN) and m.running_mean is not None)]

    def hook(i):
        def record(module, args):
            rows = _feature_rows(module, args[0]).double()
            acc = sums.setdefault(i, [0, 0.0, 0.0])
            acc[0] += rows.shape[0]
            acc[1] = acc[1] + rows.sum(0)
            acc[2] = acc[2] + rows.square().sum(0)
        return record

    if need:
        handles = [layers[i][1].register_forward_pre_hook(hook(i)) for i in need]
        was_training = model.training
        model.eval()
        try:
            dtype = next(model.parameters()).dtype
            for x, _ in clean.batches(batch_size):
                model(x.to(device, dtype))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    refs = []
    for i, (name, m) in enumerate(layers):
        if i in sums:
            n, s, sq = sums[i]
            if n < 2:
                raise ValueError(f"UniBP: norm layer {name} saw {n} feature row(s) on the clean data; need >= 2")
            mean = s / n
            var = (sq - n * mean.square()) / (n - 1)
            refs.append((mean.float(), var.clamp_min(0).float()))
        else:
            refs.append((m.running_mean.detach().clone().float(), m.running_var.detach().clone().float()))
    return refs


class StatLoss:
    """L_BN over a model's norm layers: forward pre-hooks record each layer's batch-statistic distance."""

    def __init__(self, model: nn.Module, refs: list[tuple], var_weight: float):
        layers = _norm_layers(model)
        if len(layers) != len(refs):
            raise ValueError("UniBP: reference statistics do not match the model's norm layers")
        self.var_weight, self.terms = var_weight, []
        self.handles = [m.register_forward_pre_hook(self._hook(mu, var)) for (_, m), (mu, var) in zip(layers, refs)]

    def _hook(self, mu, var):
        def record(module, args):
            rows = _feature_rows(module, args[0])
            m, v = rows.mean(0), rows.var(0)
            ref_mu, ref_var = mu.to(m.dtype), var.to(m.dtype)
            self.terms.append(_l2(m - ref_mu) + self.var_weight * _l2(v - ref_var))
        return record

    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("UniBP: no norm layer ran in this forward pass")
        value = torch.stack(self.terms).mean()
        self.terms = []
        return value

    def close(self):
        for h in self.handles:
            h.remove()


def _l2(t):
    return torch.sqrt(t.square().sum() + 1e-12)  # ‖·‖₂, differentiable at 0


# --------------------------------------------------------------------------- Fisher accumulators
class FusedFisher:
    """The diagonal Fisher by pydefend's fused op: O(P) extra memory, no per-sample gradients."""

    name = "fused"

    def __init__(self, model: nn.Module, params: list[str]):
        self.fisher = DiagFisher(model, params=params)

    def backward(self, x, y, forward_loss):
        """Forward + backward of the batch loss (mean of per-sample losses), accumulating the Fisher."""
        with self.fisher.accumulate(reduction="mean"):
            loss, parts = forward_loss(x, y)
            loss.backward()
        return parts

    def result(self) -> dict:
        return self.fisher.result()

    def close(self):
        self.fisher.detach()


class VmapFisher:
    """The same Fisher by torch.func.vmap(grad): g_n = N · ∂L/∂(sample n's copy of the affine params).

    Sample n's copy enters as a zero perturbation δ of its own affine output,
    y_n + δ_γ·x̂_n + δ_β; vmap runs over one-hot sample selectors, so every vmapped
    call evaluates the whole batch (BatchNorm couples the samples): N² sample
    forwards per step, per-sample gradients (N, P) materialised. Reference and
    benchmark baseline, not for production use.
    """

    name = "vmap"

    def __init__(self, model: nn.Module, params: list[str], chunk_size: int | None = None):
        self.model, self.chunk_size = model, chunk_size
        owner = {}
        for mname, m in model.named_modules():
            if isinstance(m, _NORMS):
                for pname, p in m.named_parameters(recurse=False):
                    owner[f"{mname}.{pname}" if mname else pname] = (m, pname)
        unknown = [n for n in params if n not in owner]
        if unknown:
            raise ValueError(f"VmapFisher handles norm affine parameters only, not {unknown}")
        self.params = {n: dict(model.named_parameters())[n] for n in params}
        self.owner = {n: owner[n] for n in params}
        self.sums = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.samples, self._active = 0, None
        modules = {id(m): m for m, _ in self.owner.values()}
        self.handles = [m.register_forward_hook(self._perturb) for m in modules.values()]

    def _perturb(self, module, args, out):
        if self._active is None:
            return None
        deltas, select = self._active
        x = args[0]
        if isinstance(module, _BN):
            use_batch = module.training or module.running_mean is None
            xhat = F.batch_norm(x, None if use_batch else module.running_mean,
                                None if use_batch else module.running_var, training=use_batch, eps=module.eps)
            shape = [1, -1] + [1] * (x.dim() - 2)
        else:
            xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            shape = list(module.normalized_shape)
        sel = select.view([-1] + [1] * (x.dim() - 1))
        extra = 0
        for name, (m, pname) in self.owner.items():
            if m is module:
                d = deltas[name].view(shape)
                extra = extra + (d * xhat if pname == "weight" else d)
        return out + sel * extra

    def backward(self, x, y, forward_loss):
        loss, parts = forward_loss(x, y)
        loss.backward()  # the batch gradient for the optimiser step, as in the fused run
        n = x.shape[0]
        # train-mode BN must not update running statistics inside vmap
        bns = [m for m in self.model.modules() if isinstance(m, _BN) and m.training and m.track_running_stats]
        for m in bns:
            m.track_running_stats = False
        zeros = {k: torch.zeros_like(p.detach()) for k, p in self.params.items()}

        def batch_loss(deltas, select):
            self._active = (deltas, select)
            try:
                return forward_loss(x, y)[0] * n
            finally:
                self._active = None

        try:  # outer no_grad: grad() still differentiates, but no graph through the parameters is kept per chunk
            with torch.no_grad():
                grads = torch.func.vmap(torch.func.grad(batch_loss), in_dims=(None, 0), chunk_size=self.chunk_size)(
                    zeros, torch.eye(n, dtype=x.dtype, device=x.device))
        finally:
            for m in bns:
                m.track_running_stats = True
        for k, g in grads.items():
            self.sums[k] += g.square().sum(0)
        self.samples += n
        return parts

    def result(self) -> dict:
        return {k: v / self.samples for k, v in self.sums.items()}

    def close(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- the defense
@register
class UniBP:
    name = "unibp"
    Config = UniBPConfig

    def __init__(self, fisher=FusedFisher):
        # `fisher` exists for the test oracle and the benchmark baseline (VmapFisher).
        self.fisher_cls = fisher

    def run(self, model: nn.Module, clean: CleanData, config: UniBPConfig | None = None, device="cpu",
            progress: bool = True) -> DefenseResult:
        config = config or UniBPConfig()
        phases = PhaseRecorder(device)
        backdoored = model.to(device).eval()
        with phases.phase("reset"):
            prime, refs = self.reset(backdoored, clean, config, device)
        with phases.phase("rectify"), thread_count_independent(prime):
            scores, rectify_trace = self.rectify(prime, refs, clean, config, device, progress)
        with phases.phase("mask"):
            mask, k = select_mask(backdoored, scores, config)
            pruned = prune(prime if config.base == "rectified" else backdoored, mask, config, device)
            pruned_acc = accuracy(pruned.eval(), clean, device=device)
        with phases.phase("finetune"), thread_count_independent(pruned):
            finetune_trace = finetune(pruned, mask, clean, config, device, progress)
        pruned.eval()
        report = {
            "defense": self.name, "config": config_dict(config), "fisher": self.fisher_cls.name,
            "clean_samples": len(clean),
            "k": k, "affine_coordinates": sum(s.numel() for s in scores.values()),
            "clean_accuracy": {"backdoored": accuracy(backdoored, clean, device=device), "pruned": pruned_acc,
                               "final": accuracy(pruned, clean, device=device)},
            "layers": layer_report(backdoored, scores, mask),
            "rectify": rectify_trace, "finetune": finetune_trace,
            "phases": phases.to_dict(),
        }
        score_lists = {n: s.flatten().tolist() for n, s in scores.items()}
        masks = {n: m.flatten().tolist() for n, m in mask.items()}
        plots = {"unibp_fisher.png": lambda path: _plot_fisher(report, score_lists, masks, path),
                 "unibp_training.png": lambda path: _plot_training(report, path)}
        return DefenseResult(pruned, report, [], plots)

    # ----------------------------------------------------------------- phases
    @staticmethod
    def reset(backdoored: nn.Module, clean: CleanData, config: UniBPConfig, device):
        """θ′ = θ* with every norm affine pair set to (γ0, β0), and the reference statistics (μ*, v*)."""
        layers = _norm_layers(backdoored)
        if not any(_affine(m) for _, m in layers):
            raise ValueError("UniBP found no BatchNorm or LayerNorm layer with affine parameters in this model")
        refs = reference_statistics(backdoored, clean, config.batch_size, device)
        prime = copy.deepcopy(backdoored)
        with torch.no_grad():
            for _, m in _norm_layers(prime):
                if _affine(m):
                    m.weight.fill_(config.reset_weight)
                    m.bias.fill_(config.reset_bias)
        return prime, refs

    def rectify(self, prime: nn.Module, refs, clean: CleanData, config: UniBPConfig, device, progress=False):
        """Fine-tune θ′ on CE + log L_BN; returns ({affine parameter name: Fisher}, per-epoch trace)."""
        names = affine_names(prime)
        dtype = next(prime.parameters()).dtype
        trainable = dict(prime.named_parameters()) if config.rectify_params == "all" else \
            {n: p for n, p in prime.named_parameters() if n in names}
        for n, p in prime.named_parameters():
            p.requires_grad_(n in trainable)
        opt = torch.optim.SGD(trainable.values(), lr=config.rectify_lr, momentum=config.momentum)
        stats = StatLoss(prime, refs, config.var_weight)
        fisher = self.fisher_cls(prime, names)

        def forward_loss(x, y):
            ce = F.cross_entropy(prime(x), y)
            l_bn = stats.loss()
            return ce + torch.log(l_bn + 1e-12), (ce, l_bn)

        prime.train()
        trace = []
        try:
            bar = progress_bar(range(config.rectify_epochs), "UniBP rectify", enabled=progress)
            for epoch in bar:
                accumulate = epoch >= config.rectify_epochs - (config.fisher_epochs or config.rectify_epochs)
                sums = [0.0, 0.0, 0.0]
                for x, y in clean.batches(config.batch_size, shuffle=True, seed=config.seed + epoch):
                    x, y = x.to(device, dtype), y.to(device)
                    opt.zero_grad(set_to_none=True)
                    if accumulate:
                        ce, l_bn = fisher.backward(x, y, forward_loss)
                    else:
                        loss, (ce, l_bn) = forward_loss(x, y)
                        loss.backward()
                    opt.step()
                    sums[0] += float(ce.detach()) * len(y)
                    sums[1] += float(l_bn.detach()) * len(y)
                    sums[2] += len(y)
                row = {"epoch": epoch + 1, "ce": sums[0] / sums[2], "l_bn": sums[1] / sums[2], "fisher": accumulate}
                trace.append(row)
                bar.set_postfix(ce=f"{row['ce']:.3f}", l_bn=f"{row['l_bn']:.3f}")
            scores = {n: s.detach().float() for n, s in fisher.result().items()}
        finally:
            fisher.close()
            stats.close()
            prime.eval()
            for p in prime.parameters():
                p.requires_grad_(False)
                p.grad = None
        return scores, trace


def affine_names(model: nn.Module) -> list[str]:
    """Names of the norm affine parameters (γ and β of BatchNorm / LayerNorm layers with affine)."""
    ids = {id(p) for _, m in _norm_layers(model) if _affine(m) for p in (m.weight, m.bias)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _mask_candidates(model: nn.Module, scores: dict, config: UniBPConfig) -> list[str]:
    weights = {id(m.weight) for _, m in _norm_layers(model) if _affine(m)}
    params = dict(model.named_parameters())
    return [n for n in scores if config.mask_params == "affine" or id(params[n]) in weights]


def mask_size(model: nn.Module, candidates: int, config: UniBPConfig) -> int:
    if config.k is not None:
        return min(config.k, candidates)
    base = candidates if config.ratio_of == "affine" else sum(p.numel() for p in model.parameters())
    if config.ratio == 0:
        return 0
    return min(candidates, max(1, math.floor(config.ratio * base)))


def select_mask(model: nn.Module, scores: dict, config: UniBPConfig) -> tuple[dict, int]:
    """Eq. 4: {parameter name: bool tensor, True where the coordinate is among the top-K scores}."""
    names = _mask_candidates(model, scores, config)
    flat = torch.cat([scores[n].flatten() for n in names])
    k = mask_size(model, flat.numel(), config)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        chosen[torch.topk(flat, k).indices] = True
    mask, start = {}, 0
    for n in scores:
        if n in names:
            size = scores[n].numel()
            mask[n] = chosen[start:start + size].view(scores[n].shape)
            start += size
        else:
            mask[n] = torch.zeros_like(scores[n], dtype=torch.bool)
    return mask, k


def prune(model: nn.Module, mask: dict, config: UniBPConfig, device) -> nn.Module:
    """Eq. 5: a copy of `model` with the masked coordinates set to N(0, noise_std²)."""
    pruned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(config.seed)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for n, m in mask.items():
            p = params[n]
            noise = torch.randn(int(m.sum()), generator=gen, dtype=torch.float64) * config.noise_std
            p[m.to(p.device)] = noise.to(device, p.dtype)
    return pruned


def finetune(model: nn.Module, mask: dict, clean: CleanData, config: UniBPConfig, device, progress=False):
    """Eq. 6: CE fine-tuning, gradients of the masked coordinates zeroed, their values kept exactly."""
    params = dict(model.named_parameters())
    dtype = next(model.parameters()).dtype
    for p in params.values():
        p.requires_grad_(True)
    held = {n: (m.to(device), params[n].detach()[m.to(device)].clone()) for n, m in mask.items() if m.any()}
    handles = [params[n].register_hook(lambda g, keep=(~m).to(params[n].dtype): g * keep)
               for n, (m, _) in held.items()]
    opt = torch.optim.SGD(params.values(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    model.train()
    trace = []
    generator = torch.Generator().manual_seed(config.seed)
    try:
        bar = progress_bar(range(config.epochs), "UniBP fine-tune", enabled=progress)
        for epoch in bar:
            total = correct = loss_sum = 0
            batches = clean.batches(config.batch_size, shuffle=True, seed=config.seed + 1000 + epoch)
            for x, y in augmented(batches, config.finetune_augment, generator):
                x, y = x.to(device, dtype), y.to(device)
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for n, (m, values) in held.items():
                        params[n][m] = values  # weight decay / momentum cannot move them
                total += len(y)
                correct += int((out.argmax(1) == y).sum())
                loss_sum += float(loss.detach()) * len(y)
            trace.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_accuracy": correct / total})
            bar.set_postfix(loss=f"{loss_sum / total:.3f}")
    finally:
        for h in handles:
            h.remove()
        model.eval()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return trace


def layer_report(model: nn.Module, scores: dict, mask: dict) -> list[dict]:
    """Per norm layer: Fisher summary per parameter and the masked channel indices with their scores."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for lname, m in _norm_layers(model):
        if not _affine(m):
            continue
        row = {"layer": lname, "kind": type(m).__name__, "features": m.weight.numel()}
        for role, p in (("weight", m.weight), ("bias", m.bias)):
            n = by_id[id(p)]
            s, k = scores[n].flatten(), mask[n].flatten()
            idx = k.nonzero().flatten().tolist()
            row[role] = {"param": n, "fisher_mean": float(s.mean()), "fisher_max": float(s.max()),
                         "masked": idx, "masked_fisher": [float(s[i]) for i in idx]}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- plots
def _plot_fisher(report, score_lists, masks, path):
    plt = pyplot()
    layers = report["layers"]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.45 * len(layers) + 2), 7), sharex=True)
    for i, row in enumerate(layers):
        for role, offset, colour in (("weight", -0.15, "tab:blue"), ("bias", 0.15, "tab:orange")):
            n = row[role]["param"]
            s, m = score_lists[n], masks[n]
            kept = [v for v, hit in zip(s, m) if not hit and v > 0]
            hit = [v for v, h in zip(s, m) if h and v > 0]
            axes[0].scatter([i + offset] * len(kept), kept, s=5, color=colour, alpha=0.5,
                            label=("γ" if role == "weight" else "β") if i == 0 else None)
            axes[0].scatter([i + offset] * len(hit), hit, s=14, color="red", marker="x",
                            label="masked" if i == 0 and role == "weight" else None)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Fisher score (rectification)")
    axes[0].legend(fontsize=8)
    idx = range(len(layers))
    w = [len(r["weight"]["masked"]) for r in layers]
    b = [len(r["bias"]["masked"]) for r in layers]
    axes[1].bar(idx, w, label="γ masked")
    axes[1].bar(idx, b, bottom=w, label="β masked")
    axes[1].set_ylabel("masked coordinates")
    axes[1].set_xticks(list(idx), [r["layer"] for r in layers], rotation=70, fontsize=7)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"UniBP: Fisher scores per layer, K = {report['k']} of {report['affine_coordinates']}")
    return save_figure(fig, path)


def _plot_training(report, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    r = report["rectify"]
    if r:
        e = [row["epoch"] for row in r]
        axes[0].plot(e, [row["ce"] for row in r], label="CE")
        axes[0].plot(e, [row["l_bn"] for row in r], label="L_BN")
        axes[0].legend(fontsize=8)
    axes[0].set_title("rectification of θ′")
    f = report["finetune"]
    if f:
        e = [row["epoch"] for row in f]
        axes[1].plot(e, [row["loss"] for row in f], label="CE")
        axes[1].plot(e, [row["train_accuracy"] for row in f], label="clean train accuracy")
        axes[1].legend(fontsize=8)
    axes[1].set_title("masked-gradient fine-tuning")
    for ax in axes:
        ax.set_xlabel("epoch")
    return save_figure(fig, path)
