"""`pydefend demo`: the main job, on the model embedded in the package.

The model is a BadNets-backdoored PreAct-ResNet-18 (width 8) on Fashion-MNIST area-averaged to 16×16,
committed with the package so that every machine defends the same weights (see README, "Fixed models", for
the command that trained it). The defender gets its 5 % clean split of the training set, 3,000 images, as
the papers' defenders do. Every registered defense runs on it with its defaults; the demo prints a
before/after table and each defense writes its report, plots and repaired model under the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import data_spec, load_checkpoint
from .data import load_dataset
from .defend import SUMMARY_HEADER, format_table, run_defense, summary_row
from .defenses import REGISTRY
from .environment import environment
from .metrics import evaluate
from .output import ResultDirectory
from .zoo import attack_from_meta

EMBEDDED = Path(__file__).resolve().parent / "checkpoints"
DEMO_CHECKPOINT = EMBEDDED / "fashion_mnist-16x16-preact_resnet18-w8-badnets-t0-r0.1-s0"


def run_demo(out_dir="pydefend-demo", methods=None, device="cpu", progress=True, overwrite=False) -> list[dict]:
    results = ResultDirectory(out_dir, overwrite)
    methods = methods or sorted(REGISTRY)
    start = time.perf_counter()
    model, meta = load_checkpoint(DEMO_CHECKPOINT, device=device)
    data = data_spec(meta)
    dataset = load_dataset(data["train"], seed=meta["seed"], test=data["test"])
    attack = attack_from_meta(meta)
    before = evaluate(model, dataset, attack, device=device)
    print(f"pydefend demo: {attack.name} on {dataset.name}, PreAct-ResNet-18 (width "
          f"{meta['model']['config']['width']}): ACC {100 * before['acc']:.1f} %, ASR {100 * before['asr']:.1f} %; "
          f"{len(meta['clean_indices']):,} clean training images for the defender; "
          f"defenses: {', '.join(methods)}")
    rows, reports = [], []
    with results as staging:
        for number, method in enumerate(methods, 1):
            print(f"[{number}/{len(methods)}] {method}", flush=True)
            fresh, _ = load_checkpoint(DEMO_CHECKPOINT, device=device)
            report, _ = run_defense(method, fresh, dataset, attack, meta["clean_indices"], device=device,
                                    progress=progress, out_dir=staging / method, model_spec=meta["model"],
                                    source={"checkpoint": str(DEMO_CHECKPOINT), "dataset": dataset.name},
                                    before=before)
            rows.append(summary_row(method, report))
            reports.append(report)
        print()
        print(format_table(SUMMARY_HEADER, rows))
        summary = {"checkpoint": DEMO_CHECKPOINT.name, "table": [SUMMARY_HEADER] + rows,
                   "environment": environment(device)}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreports, plots and repaired models: {results.out.resolve()}/<defense>/ · total "
          f"{time.perf_counter() - start:.0f} s")
    return reports
