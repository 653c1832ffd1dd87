"""Training-time image augmentation, shared by the attacker's training and the defenses' fine-tuning."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding (shifts of up to ``padding`` pixels)."""
    n, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, top:top + height, left:left + width]
                        for i, (top, left) in enumerate(offsets)])


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
