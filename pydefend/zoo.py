"""A cache of backdoored models, one per (dataset, model, attack, training settings).

The cache lives in ``$PYDEFEND_ZOO`` or ``~/.cache/pydefend/zoo``. A cached
checkpoint is reused only when its metadata records exactly the requested
settings; otherwise the model is retrained and the entry overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from .attacks import Attack, make_attack
from .checkpoint import CheckpointError, load_checkpoint, load_meta, model_spec, save_checkpoint
from .data import clean_split, load_dataset
from .train import train_backdoored

DEFAULT_ATTACKS = ("badnets", "blended", "sig", "wanet")
CLEAN = "clean"  # the attack name of a model trained the same way on unpoisoned data


def zoo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PYDEFEND_ZOO") or Path.home() / ".cache" / "pydefend" / "zoo")


def _dataset_tag(spec: str) -> str:
    """A short directory-name-safe tag for a dataset spec (a name or a path)."""
    base, _, size = spec.partition("@")
    tag = base if base in ("digits", "fashion_mnist") else Path(base).stem
    return f"{tag}-{size}" if size else tag


def get_or_train(attack_name: str, dataset_name: str = "fashion_mnist", model: str = "preact_resnet18",
                 width: int = 16, epochs: int = 6, batch_size: int = 128, lr: float = 0.05,
                 target: int = 0, rate: float = 0.10, seed: int = 0, clean_fraction: float = 0.05,
                 cache_dir: str | os.PathLike | None = None, device="cpu", progress: bool = True,
                 retrain: bool = False) -> tuple[nn.Module, dict]:
    """The cached backdoored model for these settings, training it on a miss.

    ``attack_name="clean"`` trains the same recipe without poisoning.
    Returns (model in eval mode, checkpoint metadata). The metadata holds the
    attack (to re-apply its exact trigger), the defender's clean split of the
    training set and the metrics measured after training.
    """
    dataset = load_dataset(dataset_name, seed=seed)
    attack = None if attack_name == CLEAN else make_attack(attack_name, dataset.input_shape, dataset.num_classes,
                                                           target=target, rate=rate, seed=seed)
    spec = model_spec(model, dataset.in_channels, dataset.num_classes, dataset.image_size,
                      {"width": width})
    training = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                "clean_fraction": clean_fraction}
    entry = zoo_dir(cache_dir) / (f"{_dataset_tag(dataset_name)}-{model}-w{width}-{attack_name}"
                                  f"-t{target}-r{rate:g}-s{seed}")

    if not retrain and entry.exists():
        try:
            meta = load_meta(entry)
            if (meta.get("dataset") == dataset.name and meta.get("model") == spec
                    and meta.get("attack") == (attack and attack.to_dict()) and meta.get("training") == training):
                return load_checkpoint(entry, device=device)
        except CheckpointError:
            pass  # a damaged or foreign entry is simply rebuilt

    clean_indices = clean_split(dataset, clean_fraction, seed)
    net, metrics = train_backdoored(dataset, model, spec["config"], attack, epochs=epochs,
                                    batch_size=batch_size, lr=lr, seed=seed, device=device,
                                    progress=progress, reserved_indices=clean_indices)
    save_checkpoint(entry, net, spec, dataset=dataset.name, attack=attack and attack.to_dict(), seed=seed,
                    clean_indices=clean_indices.tolist(),
                    metrics={k: metrics[k] for k in ("acc", "asr", "ra") if k in metrics},
                    train_time_s=metrics["train_time_s"], extra={"training": training})
    return load_checkpoint(entry, device=device)


def attack_from_meta(meta: dict) -> Attack | None:
    """The exact attack a checkpoint was trained with (None for a clean model)."""
    return Attack.from_dict(meta["attack"]) if meta.get("attack") else None
