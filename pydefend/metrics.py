"""Backdoor metrics: ACC, ASR, RA and DER.

- ACC: accuracy on the clean test set.
- ASR: triggered test images of non-target classes predicted as the attack's
  label (for all-to-all attacks: every image, as (label + 1) mod K).
- RA: the same triggered images predicted as their true label.
- DER = (max(0, ΔASR) − max(0, ΔACC) + 1) / 2 with ΔX = X_before − X_after:
  1 for a defense that removes the backdoor at no accuracy cost, 0.5 for one
  that changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attacks import Attack
from .data import Dataset


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"need equal non-empty shapes, got {tuple(predictions.shape)} and "
                         f"{tuple(labels.shape)}")
    return (predictions == labels).double().mean().item()


def attack_success_rate(triggered_predictions: torch.Tensor, labels: torch.Tensor,
                        attack: Attack) -> float:
    """Fraction of counted triggered images (see ``Attack.evaluation_mask``) sent to the attacker's label."""
    mask = attack.evaluation_mask(labels)
    return accuracy(triggered_predictions[mask], attack.poison_label(labels)[mask])


def robust_accuracy(triggered_predictions: torch.Tensor, labels: torch.Tensor,
                    attack: Attack) -> float:
    """Fraction of counted triggered images still classified as their true label."""
    mask = attack.evaluation_mask(labels)
    return accuracy(triggered_predictions[mask], labels[mask])


def defense_effectiveness_rating(before: dict, after: dict) -> float:
    """DER from metric dicts with keys 'acc' and 'asr' (values in [0, 1])."""
    asr_drop = before["asr"] - after["asr"]
    acc_drop = before["acc"] - after["acc"]
    return (max(0.0, asr_drop) - max(0.0, acc_drop) + 1.0) / 2.0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device="cpu",
            transform=None) -> torch.Tensor:
    """Predicted labels for ``x`` in batches; ``transform`` (e.g. a trigger) is applied per batch."""
    predictions = []
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size].to(device)
        if transform is not None:
            batch = transform(batch)
        predictions.append(model(batch).argmax(dim=1).cpu())
    return torch.cat(predictions)


def evaluate(model: nn.Module, dataset: Dataset, attack: Attack | None, batch_size: int = 256,
             device="cpu") -> dict:
    """{'acc', 'asr', 'ra'} on the test set (ASR/RA omitted without an attack).

    Runs in eval mode without gradients and restores the model's mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        labels = dataset.y_test
        metrics = {"acc": accuracy(predict(model, dataset.x_test, batch_size, device), labels)}
        if attack is not None:
            triggered = predict(model, dataset.x_test, batch_size, device, transform=attack.apply)
            metrics["asr"] = attack_success_rate(triggered, labels, attack)
            metrics["ra"] = robust_accuracy(triggered, labels, attack)
    finally:
        model.train(was_training)
    return metrics


@torch.no_grad()
def detection_rates(model: nn.Module, dataset: Dataset, attack: Attack | None, batch_size: int = 256,
                    device="cpu") -> dict:
    """Test-time trigger detection by a model whose forward(x, return_flags=True) gives (logits, flags).

    TPR: triggered test images (those counted for ASR) flagged; absent without an attack. FPR (BNA §5.4):
    clean test images of the model's detected target classes (`model.targets`) flagged; fpr_all: any clean
    test image flagged (only images predicted as a target can be).
    """
    def flagged(x, transform=None):
        out = []
        for start in range(0, x.shape[0], batch_size):
            batch = x[start:start + batch_size].to(device)
            out.append(model(transform(batch) if transform else batch, return_flags=True)[1].cpu())
        return torch.cat(out)

    was_training = model.training
    model.eval()
    try:
        clean_flags = flagged(dataset.x_test)
        rates = {"fpr_all": clean_flags.double().mean().item()}
        targets = torch.as_tensor(list(getattr(model, "targets", [])), dtype=dataset.y_test.dtype)
        of_targets = torch.isin(dataset.y_test, targets)
        if of_targets.any():
            rates["fpr"] = clean_flags[of_targets].double().mean().item()
        if attack is not None:
            mask = attack.evaluation_mask(dataset.y_test)
            rates["tpr"] = flagged(dataset.x_test[mask], attack.apply).double().mean().item()
    finally:
        model.train(was_training)
    return rates
