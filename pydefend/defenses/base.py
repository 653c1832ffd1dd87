"""The common shape of a defense: model + the defender's clean data + config in,
repaired model + report out."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..train import random_crop


@dataclass
class CleanData:
    """The defender's clean images (N, C, H, W) and labels: a split of *training* data, never the test set."""
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"clean data has {self.x.shape[0]} images but {self.y.shape[0]} labels")
        if self.x.shape[0] < 2:
            raise ValueError("a defense needs at least two clean samples")

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


AUGMENTATIONS = ("auto", "none", "crop", "crop+flip")
MIN_CROP_SIZE = 16  # "auto" crops images at least this large (BackdoorBench's smallest are 28×28)


def augmented(batches: Iterator[tuple], mode: str, generator: torch.Generator) -> Iterator[tuple]:
    """Image batches with BackdoorBench's training augmentation, as the authors' fine-tuning sees them.

    "crop": a random shift of up to H/8 pixels after zero padding (4 at CIFAR's 32×32); "crop+flip" adds a
    horizontal flip with probability 1/2; "none" passes batches through. "auto" is "crop" for images of at
    least 16×16 pixels and "none" below: on 8×8 digits crops cost 6-18 points of accuracy in fine-tuning.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
    for x, y in batches:
        chosen = mode
        if mode == "auto":
            chosen = "crop" if x.dim() == 4 and min(x.shape[-2:]) >= MIN_CROP_SIZE else "none"
        if chosen != "none" and x.dim() == 4:
            x = random_crop(x, max(1, x.shape[-2] // 8), generator)
            if chosen == "crop+flip":
                flip = torch.rand(x.shape[0], generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        yield x, y


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
