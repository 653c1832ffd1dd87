"""UniBP's rectification phase (CE + log L_BN on θ′ while accumulating the BN-affine Fisher):
pydefend's fused Fisher vs the same phase with per-sample gradients from torch.func.vmap(grad)
(`VmapFisher`: exact for the batch-coupled definition, so every vmapped call runs the whole batch),
and the same phase with no Fisher at all (the floor). Same model, data, batches and steps; each
implementation and batch size in its own process. Time per step and peak memory of the phase.

    python bench/bench_unibp.py [--width 8] [--batches 32 128] [--steps 3] [--chunk 16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table  # noqa: E402

from pydefend.data import clean_split, load_dataset  # noqa: E402
from pydefend.defenses import CleanData, UniBP, UniBPConfig  # noqa: E402
from pydefend.defenses.unibp import FusedFisher, VmapFisher  # noqa: E402
from pydefend.models import build_model  # noqa: E402
from pydefend.monitor import PhaseRecorder  # noqa: E402


class NoFisher:
    """The rectification step alone: forward + backward of the batch loss."""

    name = "none"

    def __init__(self, model, params):
        self.params = {n: p for n, p in model.named_parameters() if n in params}

    def backward(self, x, y, forward_loss):
        loss, parts = forward_loss(x, y)
        loss.backward()
        return parts

    def result(self):
        return {n: torch.zeros_like(p) for n, p in self.params.items()}

    def close(self):
        pass


def child(args):
    dataset = load_dataset(args.data)
    idx = clean_split(dataset, args.clean_fraction, seed=0)[: args.batch * args.steps]
    clean = CleanData(dataset.x_train[idx], dataset.y_train[idx], dataset.num_classes)
    torch.manual_seed(0)
    model = build_model(args.model, dataset.in_channels, dataset.num_classes, dataset.image_size,
                        width=args.width).eval()
    fisher = {"none": NoFisher, "fused": FusedFisher,
              "vmap": lambda m, p: VmapFisher(m, p, chunk_size=args.chunk)}[args.only]
    config = UniBPConfig(rectify_epochs=1, fisher_epochs=1, batch_size=args.batch)
    defense = UniBP(fisher=fisher)
    prime, refs = defense.reset(model, clean, config, "cpu")
    # warm-up on 2 samples: loads kernels without raising the process's memory baseline
    defense.rectify(prime, refs, CleanData(clean.x[:2], clean.y[:2], 10), config, "cpu")
    prime, refs = defense.reset(model, clean, config, "cpu")
    phases = PhaseRecorder("cpu")
    with phases.phase("rectify"):
        scores, _ = defense.rectify(prime, refs, clean, config, "cpu")
    out = phases.to_dict()["rectify"]
    out["steps"] = args.steps
    out["checksum"] = float(sum(s.double().sum() for s in scores.values()))
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16, help="vmap chunk_size (bounds its memory at chunk x batch)")
    p.add_argument("--clean-fraction", type=float, default=0.05)
    p.add_argument("--only", choices=["none", "fused", "vmap"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only is not None:
        return child(args)

    print(f"UniBP rectification · {args.model} width {args.width} · {args.data} · {args.steps} steps · "
          f"vmap chunk {args.chunk} · {machine_line('cpu')}\n")
    names = {"none": "no Fisher (floor)", "fused": "pydefend fused DiagFisher",
             "vmap": "torch.func.vmap(grad), exact"}
    rows = []
    for batch in args.batches:
        results = {}
        for key in names:
            cmd = [sys.executable, __file__, "--only", key, "--batch", str(batch), "--data", args.data,
                   "--model", args.model, "--width", str(args.width), "--steps", str(args.steps),
                   "--chunk", str(args.chunk), "--clean-fraction", str(args.clean_fraction)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[key] = json.loads(out.strip().splitlines()[-1])
        if results["none"]["checksum"] != 0 or abs(results["fused"]["checksum"] - results["vmap"]["checksum"]) > \
                1e-3 * abs(results["vmap"]["checksum"]):
            raise SystemExit(f"fused and vmap Fisher disagree: {results}")
        floor = results["none"]
        for key, name in names.items():
            r = results[key]
            rows.append([name, str(batch), f"{r['seconds'] / r['steps']:.2f}",
                         f"{results['vmap']['seconds'] / r['seconds']:.1f}×", f"{r['peak_bytes'] / 2**20:.0f}",
                         f"{(r['peak_bytes'] - floor['peak_bytes']) / 2**20:+.0f}"])
    print(markdown_table(["implementation", "batch", "s / step", "speed-up vs vmap", "peak MiB",
                          "peak − floor MiB"], rows))


if __name__ == "__main__":
    main()
