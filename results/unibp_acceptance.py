"""UniBP on the Fashion-MNIST PreAct-ResNet-18 zoo models (width 8 unless --width), with a K sweep.

One reset + rectification per attack (its Fisher is the one the default run uses: the run is
deterministic), then mask / prune / fine-tune / evaluate for each K. The default row's time is
reset + rectify + mask + fine-tune, as in `UniBP.run`.

    PYDEFEND_ZOO=/work/zoo OMP_NUM_THREADS=1 python results/unibp_acceptance.py [--ratios 0.03,0.07,0.15] \
        [--augment crop,crop+flip] [--width 16] badnets ...

Appends one JSON line per (attack, K, fine-tuning augmentation) to results/runs/unibp.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pydefend.checkpoint import load_checkpoint
from pydefend.data import load_dataset
from pydefend.defenses import CleanData, UniBP, UniBPConfig
from pydefend.defenses.unibp import finetune, prune, select_mask
from pydefend.metrics import defense_effectiveness_rating, evaluate
from pydefend.zoo import attack_from_meta, zoo_dir

RATIOS = (0.03, 0.07, 0.15)  # 0.03 is the default


def main(attacks, ratios=RATIOS, augments=("crop",), width=8):
    out = Path(__file__).resolve().parent / "runs"
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("fashion_mnist")
    for name in attacks:
        model, meta = load_checkpoint(zoo_dir() / f"fashion_mnist-preact_resnet18-w{width}-{name}-t0-r0.1-s0")
        attack = attack_from_meta(meta)
        idx = torch.as_tensor(meta["clean_indices"])
        clean = CleanData(dataset.x_train[idx], dataset.y_train[idx], dataset.num_classes)
        before = evaluate(model, dataset, attack)
        base = UniBPConfig()
        start = time.perf_counter()
        prime, refs = UniBP.reset(model, clean, base, "cpu")
        scores, _ = UniBP().rectify(prime, refs, clean, base, "cpu")
        rectify_s = time.perf_counter() - start
        for ratio, augment in [(r, a) for r in ratios for a in augments]:
            config = UniBPConfig(ratio=ratio, finetune_augment=augment)
            start = time.perf_counter()
            mask, k = select_mask(model, scores, config)
            pruned = prune(model, mask, config, "cpu")
            finetune(pruned, mask, clean, config, "cpu")
            finetune_s = time.perf_counter() - start
            after = evaluate(pruned, dataset, attack)
            row = {"attack": name, "width": width, "ratio": ratio, "finetune_augment": augment, "k": k, "affine": sum(s.numel() for s in scores.values()),
                   "clean": len(clean), "before": before, "after": after,
                   "der": defense_effectiveness_rating(before, after),
                   "seconds": {"reset_rectify": round(rectify_s, 1), "mask_finetune": round(finetune_s, 1)}}
            print(json.dumps(row), flush=True)
            with open(out / "unibp.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    argv, ratios, augments, width = sys.argv[1:], RATIOS, ("crop",), 8
    while argv[:1] in (["--ratios"], ["--augment"], ["--width"]):
        if argv[0] == "--ratios":
            ratios = tuple(float(r) for r in argv[1].split(","))
        elif argv[0] == "--width":
            width = int(argv[1])
        else:
            augments = tuple(argv[1].split(","))
        argv = argv[2:]
    main(argv or ["badnets", "blended", "sig", "wanet"], ratios, augments, width)
