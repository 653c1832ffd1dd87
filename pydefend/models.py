"""Reference classifiers for any channel count, image size and class count.

Models are plain ``nn.Module``s; build them with :func:`build_model` so the
(name, shapes, config) triple can be stored as JSON and the model rebuilt from
a checkpoint. Defenses must find layers from the module graph, not from the
attribute names used here.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


# ----------------------------------------------------------------------------
# ResNets (CIFAR-style stem: 3×3 conv, no max-pool)

class PreActBlock(nn.Module):
    """Pre-activation basic block: BN → ReLU → conv, twice, identity shortcut."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation basic block: conv → BN → ReLU, twice, projection shortcut if needed."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, blocks_per_stage, in_channels, num_classes, width, preact):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        # A post-activation net normalises the stem; a pre-activation net does it in the blocks.
        self.stem_post = nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        stages, in_planes = [], width
        for index, count in enumerate(blocks_per_stage):
            planes = width * 2 ** index
            for block_index in range(count):
                stride = 2 if index > 0 and block_index == 0 else 1
                stages.append(block(in_planes, planes, stride))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        # Pre-activation nets need a final BN + ReLU before pooling.
        self.head_norm = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU()) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.stem_post(self.stem(x))
        out = self.head_norm(self.stages(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def preact_resnet18(in_channels, num_classes, image_size, width=64):
    return ResNet(PreActBlock, [2, 2, 2, 2], in_channels, num_classes, width, preact=True)


def resnet18(in_channels, num_classes, image_size, width=64):
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, width, preact=False)


# ----------------------------------------------------------------------------
# VGG-11 with BatchNorm

VGG11_LAYOUT = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]  # channels in units of width


def vgg11_bn(in_channels, num_classes, image_size, width=64):
    height, wide = _pair(image_size)
    layers, channels = [], in_channels
    for item in VGG11_LAYOUT:
        if item == "M":
            # Skip pools that would shrink a small image below 1×1.
            if min(height, wide) >= 2:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                height, wide = math.ceil(height / 2), math.ceil(wide / 2)
            continue
        out_channels = width * item
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant: stride-1 stem)

class InvertedResidual(nn.Module):
    def __init__(self, in_planes, planes, expansion, stride):
        super().__init__()
        hidden = in_planes * expansion
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == planes

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


# (expansion, channels relative to a width-32 net, repeats, stride)
MOBILENET_V2_LAYOUT = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(in_channels, num_classes, image_size, width=32):
    def scaled(channels):
        return max(8, int(round(channels * width / 32)))

    layers = [nn.Conv2d(in_channels, scaled(32), 3, 1, 1, bias=False), nn.BatchNorm2d(scaled(32)),
              nn.ReLU6()]
    in_planes = scaled(32)
    for expansion, channels, repeats, stride in MOBILENET_V2_LAYOUT:
        for index in range(repeats):
            layers.append(InvertedResidual(in_planes, scaled(channels), expansion,
                                           stride if index == 0 else 1))
            in_planes = scaled(channels)
    head = scaled(1280)
    layers += [nn.Conv2d(in_planes, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head, num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------
# Vision transformer

class TransformerBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        normed = self.norm1(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, in_channels, num_classes, image_size, width, depth, heads, patch_size,
                 mlp_ratio):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} must be divisible by heads {heads}")
        height, wide = _pair(image_size)
        self.patch_size = patch_size
        # Images whose size is not a multiple of the patch are zero-padded at the
        # bottom/right so no pixel (e.g. a corner trigger) is silently dropped.
        self.padding = (0, -wide % patch_size, 0, -height % patch_size)  # fixed at build: keeps forward traceable
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, patch_size)
        tokens = math.ceil(height / patch_size) * math.ceil(wide / patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        if any(self.padding):
            x = F.pad(x, self.padding)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens + self.pos_embed)
        return self.head(self.norm(tokens[:, 0]))


def vit(in_channels, num_classes, image_size, width=128, depth=6, heads=4, patch_size=None,
        mlp_ratio=2):
    if patch_size is None:
        patch_size = 4 if min(_pair(image_size)) >= 16 else 2
    return ViT(in_channels, num_classes, image_size, width, depth, heads, patch_size, mlp_ratio)


# ----------------------------------------------------------------------------
# Small CNN for quick experiments and tests

def simple_cnn(in_channels, num_classes, image_size, width=16):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, num_classes),
    )


MODELS = {
    "preact_resnet18": preact_resnet18,
    "resnet18": resnet18,
    "vgg11_bn": vgg11_bn,
    "mobilenet_v2": mobilenet_v2,
    "vit": vit,
    "simple_cnn": simple_cnn,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size, **config) -> nn.Module:
    """Build a registered model. ``config`` (e.g. ``width``) must be JSON-serialisable."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    sides = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(sides) not in (1, 2):
        raise ValueError(f"model {name!r}: image_size must be N or (H, W), got {image_size!r}")
    sizes = {"in_channels": in_channels, "num_classes": num_classes, "image_size": sides,
             **{key: value for key, value in config.items()
                if key in ("width", "depth", "heads") or key == "patch_size" and value is not None}}
    for key, value in sizes.items():
        for number in value if key == "image_size" else [value]:
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                kind = "positive integers" if key == "image_size" else "a positive integer"
                raise ValueError(f"model {name!r}: {key} must be {kind}, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"model {name!r} needs num_classes >= 2, got {num_classes}")
    builder = MODELS[name]
    accepted = list(inspect.signature(builder).parameters)[3:]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted)}")
    return builder(in_channels, num_classes, image_size, **config)
