"""UNIT's tightening phase: pydefend (fused clip, frozen weights) vs a straightforward
eager implementation of the same algorithm (torch.minimum bounds after the
activation, weights requiring grad as in the authors' code). Same model, data,
batch and steps; peak memory and time of the tightening phase. A step here is
one mini-batch update (step_unit="batch"), so --steps counts Adam updates.

    python bench/bench_unit.py [--width 64] [--batch 128] [--steps 10] [--data fashion_mnist]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table  # noqa: E402

from pydefend.data import clean_split, load_dataset  # noqa: E402
from pydefend.defenses import UNIT, UNITConfig, CleanData  # noqa: E402
from pydefend.models import build_model  # noqa: E402


class EagerBound(nn.Module):
    """min(relu(x), σ) (or min(x, σ)) in plain PyTorch: autograd keeps the activation."""

    def __init__(self, shape, channel_dim=1, relu=False, device=None):
        super().__init__()
        self.upper = nn.Parameter(torch.full(tuple(shape), float("inf"), device=device))
        self.channel_dim, self.relu = channel_dim, relu

    def forward(self, x):
        if self.relu:
            x = torch.relu(x)
        if self.upper.dim() == 1:
            view = [1] * x.dim()
            view[self.channel_dim] = -1
            return torch.minimum(x, self.upper.view(view))
        return torch.minimum(x, self.upper)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clean-fraction", type=float, default=0.05)
    p.add_argument("--only", choices=["eager", "pydefend"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.only is not None:  # child process: one implementation, result as JSON
        dataset = load_dataset(args.data)
        idx = clean_split(dataset, args.clean_fraction, seed=0)
        clean = CleanData(dataset.x_train[idx], dataset.y_train[idx], dataset.num_classes)
        defense = UNIT(EagerBound, freeze_weights=False) if args.only == "eager" else UNIT()
        torch.manual_seed(0)
        model = build_model(args.model, dataset.in_channels, dataset.num_classes, dataset.image_size,
                            width=args.width)
        config = UNITConfig(steps=args.steps, batch_size=args.batch, step_unit="batch")
        report = defense.run(model, clean, config, progress=False).report
        print(json.dumps({"tighten": report["phases"]["tighten"], "clean": len(clean), "dataset": dataset.name}))
        return
    print(f"UNIT tightening · {args.model} width {args.width} · {args.data} · batch {args.batch} · "
          f"{args.steps} steps · {machine_line('cpu')}\n")
    # each implementation in a fresh process, so neither inherits the other's allocator state
    names = {"eager": "eager (torch.minimum, weights require grad)", "pydefend": "pydefend (fused clip, frozen weights)"}
    results = {}
    for key, name in names.items():
        # A fixed mmap threshold stops glibc from keeping freed activation-sized blocks in the heap,
        # so the sampled RSS peak follows live tensor memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, __file__, "--only", key] + (argv if argv is not None else sys.argv[1:]),
                             capture_output=True, text=True, check=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])["tighten"]
    eager = results[names["eager"]]
    rows = [[name, f"{r['seconds']:.1f}", f"{eager['seconds'] / r['seconds']:.2f}×",
             f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / max(eager['peak_bytes'], 1):.2f}"]
            for name, r in results.items()]
    print(markdown_table(["implementation", "tighten s", "speed-up", "peak MiB", "peak / eager"], rows))


if __name__ == "__main__":
    main()
