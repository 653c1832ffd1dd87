"""Train a backdoored classifier on a poisoned copy of a dataset."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import Attack, poison_dataset
from .augment import random_crop
from .data import Dataset
from .metrics import evaluate
from .models import build_model
from .progress import Progress
from .reproducible import thread_count_independent


def train_backdoored(dataset: Dataset, model_name: str | nn.Module, model_config: dict | None, attack: Attack | None,
                     epochs: int = 10, batch_size: int = 128, lr: float = 0.05, seed: int = 0,
                     device="cpu", progress: bool = True, weight_decay: float = 5e-4,
                     augment: bool = False, reserved_indices=None, optimizer: str = "sgd") -> tuple[nn.Module, dict]:
    """Poison the training set with ``attack`` and train ``model_name`` on it: one of pydefend's models, built
    with ``model_config``, or a model you built (``model_config`` None).

    SGD (momentum 0.9, Nesterov) or AdamW (``optimizer="adamw"``, which transformers need) with a one-cycle
    learning-rate schedule. ``augment``
    adds random crops with 2-pixel padding, applied after the trigger as an
    attacker poisoning a dataset would see it; crops only shift a corner patch.
    ``reserved_indices`` (e.g. the defender's clean split) are never poisoned.
    Returns the model in eval mode and {'acc', 'asr', 'ra', 'train_time_s', ...}.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"need epochs >= 1, batch_size >= 1, a finite lr > 0; got {epochs}, {batch_size}, {lr}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    torch.manual_seed(seed)
    if isinstance(model_name, nn.Module):
        model, model_name = model_name.to(device), type(model_name).__name__
    else:
        model = build_model(model_name, dataset.in_channels, dataset.num_classes, dataset.image_size,
                            **(model_config or {})).to(device)
    if attack is None:
        x_train, y_train, poisoned = dataset.x_train, dataset.y_train, torch.empty(0, dtype=torch.long)
    else:
        x_train, y_train, poisoned = poison_dataset(dataset, attack, seed=seed, exclude=reserved_indices)
    n = x_train.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                    weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    bar = Progress(description=f"{attack.name if attack else 'clean'}/{model_name}", enabled=progress,
                   total=epochs * steps_per_epoch)
    start = time.perf_counter()
    with thread_count_independent(model), contextlib.closing(bar):
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            loss_sum, correct = 0.0, 0
            for step in range(steps_per_epoch):
                index = order[step * batch_size:(step + 1) * batch_size]
                x, y = x_train[index], y_train[index]
                if augment:
                    x = random_crop(x, 2, generator)
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(index)
                correct += (logits.argmax(1) == y).sum().item()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.write(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.4f}, train acc {correct / n:.4f}")
    train_time = time.perf_counter() - start
    metrics = evaluate(model, dataset, attack, batch_size=max(batch_size, 256), device=device)
    metrics.update(train_time_s=train_time, poisoned=len(poisoned), epochs=epochs)
    model.eval()
    return model, metrics
