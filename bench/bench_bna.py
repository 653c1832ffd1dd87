"""BNA's mitigation (alignment) phase: the fused soft_histogram vs the dense eager soft histogram
(`soft_histogram_reference`: C × N' × M sigmoids, the way the authors' code builds it), plugged into
the same `BNA._align`. Same model, clean data, fixed BadNets trigger (3×3 white patch, bottom right,
target 0, sources 1–9), batches and epochs; each provider in its own process. Detection is not timed:
it is the same code for both providers, and the alignment's cost does not depend on the trigger.
The bins span the defender's whole clean split (5 %, as BNA.run); the first --samples images of
classes 1–9 are aligned on. The phase covers the clean histograms, the divergence before, the
training epochs and the divergence after each epoch. Time, peak memory above the phase's start, and
the total divergence before and after: the same function, so "before" must agree to fp32 rounding;
"after" follows two optimisation trajectories, which drift apart (TV's sign-valued gradient under
Adam amplifies rounding-level differences), so it only agrees roughly.

    python bench/bench_bna.py [--width 8] [--samples 1000] [--batch 128] [--epochs 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table  # noqa: E402

from pydefend.checkpoint import load_checkpoint  # noqa: E402
from pydefend.data import clean_split, load_dataset  # noqa: E402
from pydefend.defenses import BNA, BNAConfig, CleanData  # noqa: E402
from pydefend.defenses.bna import BNAModel, TriggerBank, _Sites, find_sites  # noqa: E402
from pydefend.models import build_model  # noqa: E402
from pydefend.monitor import PhaseRecorder  # noqa: E402
from pydefend.ops.soft_histogram import soft_histogram, soft_histogram_reference  # noqa: E402

ZOO = Path("/work/zoo/fashion_mnist-preact_resnet18-w8-badnets-t0-r0.1-s0")
PROVIDERS = {"eager": ("dense eager (C×N'×M sigmoids, as the authors' code)", soft_histogram_reference),
             "fused": ("pydefend fused soft_histogram", soft_histogram)}
TARGET, SOURCES = 0, list(range(1, 10))


def load_model(dataset, width, clean):
    """The trained BadNets zoo model when it is there (and matches --width), else random weights whose BN
    running statistics come from the clean images, so that BNA's bins span realistic ranges."""
    if width == 8 and ZOO.exists():
        return load_checkpoint(ZOO)[0], "trained BadNets zoo model"
    torch.manual_seed(0)
    model = build_model("preact_resnet18", dataset.in_channels, dataset.num_classes, dataset.image_size,
                        width=width).train()
    with torch.no_grad():
        for x, _ in clean.batches(128):
            model(x)
    return model.eval(), "random init, BN statistics from the clean images"


def badnets_trigger(image_shape):
    bank = TriggerBank("patch", [TARGET], [SOURCES], image_shape)
    with torch.no_grad():  # tanh(±20) rounds to ±1: mask 1 on the patch and 0 elsewhere, pattern 1 (white)
        bank.mask_raw.fill_(-20.0)
        bank.mask_raw[..., -3:, -3:] = 20.0
        bank.pattern_raw.fill_(20.0)
    for p in bank.parameters():
        p.requires_grad_(False)
    return bank


def child(args):
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    idx = clean_split(dataset, 0.05, seed=0)
    clean = CleanData(dataset.x_train[idx], dataset.y_train[idx], dataset.num_classes)
    model, origin = load_model(dataset, args.width, clean)
    model = model.to(args.device)
    for p in model.parameters():  # as BNA.mitigate: only the transforms' μ, σ, v, ω are trained
        p.requires_grad_(False)
    keep = torch.isin(clean.y, torch.tensor(SOURCES)).nonzero().flatten()[: args.samples]
    data = CleanData(clean.x[keep], clean.y[keep], clean.num_classes)
    bank = badnets_trigger(tuple(clean.x.shape[1:])).to(args.device)
    config = BNAConfig(epochs=args.epochs, batch_size=args.batch)
    sites = find_sites(model, config.layers)
    hooks = _Sites(model, sites)
    defense = BNA(histogram=PROVIDERS[args.only][1])
    layout = defense._clean_layout(model, hooks, clean, config, args.device)
    channels = [lo.numel() for lo, _, _ in layout["bins"]]
    transforms = BNAModel(model, [TARGET], sites, channels, layout["channel_dims"]).to(args.device) \
        .transforms[str(TARGET)]

    def align(images):
        defense._initialise(transforms, hooks, layout, sites, model)
        return defense._align(model, hooks, transforms, layout, images, bank, 0, config, args.device, False,
                              TARGET)["epochs"]

    # warm-up on 2 images: loads kernels without raising the process's memory baseline
    align(CleanData(data.x[:2], data.y[:2], data.num_classes))
    phases = PhaseRecorder(args.device)
    with phases.phase("align"):
        trace = align(data)
    out = phases.to_dict()["align"]
    bins = [b for _, _, bs in layout["bins"] for b in bs]
    out.update(before=trace[0]["total"], after=trace[-1]["total"], clean=len(clean), images=len(data),
               sites=len(sites), neurons=len(bins), bins=sum(bins), max_bins=max(bins), model=origin)
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--samples", type=int, default=1000, help="clean images of classes 1-9 aligned on")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="alignment epochs")
    p.add_argument("--providers", default="eager,fused", help="comma-separated: " + ", ".join(PROVIDERS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=list(PROVIDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only is not None:
        return child(args)

    keys = [k.strip() for k in args.providers.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(PROVIDERS))
    if unknown:
        p.error(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
    torch.set_num_threads(args.threads)  # for machine_line; the children set their own
    results = {}
    for key in keys:
        options = ("data", "width", "samples", "batch", "epochs", "threads", "device")
        cmd = [sys.executable, __file__, "--only", key] + [f"--{a}={getattr(args, a)}" for a in options]
        # A fixed mmap threshold stops glibc from keeping freed histogram-sized blocks in the heap,
        # so the sampled RSS peak follows live tensor memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        results[key] = json.loads(out.strip().splitlines()[-1])
    r0 = next(iter(results.values()))
    print(f"BNA alignment · preact_resnet18 width {args.width} ({r0['model']}) · {args.data} · "
          f"bins from {r0['clean']} clean images, {r0['images']} of classes 1-9 aligned · batch {args.batch} · "
          f"{args.epochs} epoch(s) · "
          f"{r0['sites']} BN sites, {r0['neurons']} neurons, {r0['bins']} bins (max {r0['max_bins']}) · "
          f"{machine_line(args.device)}\n")
    eager = results.get("eager")
    rows = [[PROVIDERS[k][0], f"{r['seconds']:.1f}",
             f"{eager['seconds'] / r['seconds']:.1f}×" if eager else "–", f"{r['peak_bytes'] / 2**20:.0f}",
             f"{r['peak_bytes'] / max(eager['peak_bytes'], 1):.3f}" if eager else "–",
             f"{r['before']:.5f} → {r['after']:.5f}"] for k, r in results.items()]
    print(markdown_table(["histogram", "align s", "speed-up vs eager", "peak MiB", "peak / eager",
                          "total divergence before → after"], rows))
    fused = results.get("fused")
    if eager and fused and abs(fused["before"] - eager["before"]) > 1e-4 * eager["before"]:
        raise SystemExit(f"fused and eager divergences disagree: {eager['before']} vs {fused['before']}")


if __name__ == "__main__":
    main()
