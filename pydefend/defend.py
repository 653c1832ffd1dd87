"""Running a defense on a model and judging it: metrics before/after, DER,
report, plots and the repaired model on disk."""
from __future__ import annotations

import dataclasses
import json
import numbers
import time
import typing
from pathlib import Path

import numpy as np
import torch

from .defenses import CleanData, get_defense
from .defenses.base import preset_config, shown
from .environment import environment
from .metrics import defense_effectiveness_rating, detection_rates, evaluate
from .monitor import METHOD as MEMORY_METHOD
from .output import ResultDirectory
from .repaired import save_repaired


def parse_overrides(config_cls, pairs: list[str], preset: str | None = None):
    """A config from `--set key=value` strings (typed by the dataclass fields) and an optional preset.

    Every problem (unknown key, unparsable or out-of-range value, unknown preset) is one line of ValueError.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad setting {shown(pair)}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = hints[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                values[key] = text.lower() in ("true", "1", "yes")
            elif kind in (int, float, str):
                values[key] = kind(text)
            else:  # tuples and other structured values: JSON
                value = json.loads(text)
                values[key] = tuple(value) if isinstance(value, list) else value
        except ValueError:
            expected = getattr(kind, "__name__", kind)
            raise ValueError(f"bad value for {key}: {shown(text)} (expected {expected})") from None
        except RecursionError:
            raise ValueError(f"bad value for {key}: {shown(text)} (JSON nested too deeply)") from None
    if preset is not None:
        return preset_config(config_cls, preset, values)
    return config_cls(**values)


def checked_indices(indices, size: int) -> torch.Tensor:
    """`indices` of the defender's clean samples as a 1-D int64 tensor, refused (one line of ValueError) unless
    they are at least two distinct integers in [0, size)."""
    if isinstance(indices, torch.Tensor):
        if indices.dtype in (torch.bool,) or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"clean_indices must be integers, got a {indices.dtype} tensor")
        idx = indices.detach().to("cpu", torch.long)
    elif isinstance(indices, np.ndarray):
        if indices.dtype.kind not in "iu":
            raise ValueError(f"clean_indices must be integers, got an array of {indices.dtype}")
        if indices.dtype.kind == "u" and indices.size and indices.max() > np.iinfo(np.int64).max:
            raise ValueError(f"clean_indices must be in [0, {size}), got {int(indices.max())}")
        idx = torch.from_numpy(indices.astype(np.int64))
    elif isinstance(indices, (list, tuple, range)):
        bad = next((v for v in indices if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_))),
                   None)
        if bad is not None:
            raise ValueError(f"clean_indices must be integers, got {shown(bad)}")
        out = next((v for v in indices if not 0 <= v < size), None)
        if out is not None:
            raise ValueError(f"clean_indices must be in [0, {size}) (the training samples), got {shown(out)}")
        idx = torch.tensor([int(v) for v in indices], dtype=torch.long)
    else:
        raise ValueError(f"clean_indices must be a list or tensor of integers, got {type(indices).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"clean_indices must be one-dimensional, got shape {tuple(idx.shape)}")
    if idx.numel() < 2:
        raise ValueError(f"a defense needs at least two clean samples, got {idx.numel()} clean_indices")
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= size:
        raise ValueError(f"clean_indices must be in [0, {size}) (the training samples), "
                         f"got {low if low < 0 else high}")
    values, counts = idx.unique(return_counts=True)
    if values.numel() != idx.numel():
        repeated = int((counts > 1).sum())
        worst = int(counts.argmax())
        raise ValueError(f"clean_indices must be distinct, but {repeated} "
                         f"{'index repeats' if repeated == 1 else 'indices repeat'} "
                         f"(e.g. {int(values[worst])} appears {int(counts[worst])} times)")
    return idx


def run_defense(method: str, model, dataset, attack, clean_indices, config=None, device="cpu",
                progress: bool = True, out_dir=None, model_spec: dict | None = None, source: dict | None = None,
                before: dict | None = None, overwrite: bool = False):
    """Returns (report dict, DefenseResult). Writes report, plots and model into out_dir when given, all at once
    when the run is complete; an out_dir that already holds results is replaced only with ``overwrite``.

    ``before``: the model's metrics on this dataset and attack, when already measured.
    """
    defense_cls = get_defense(method)
    idx = checked_indices(clean_indices, len(dataset.x_train))
    results = ResultDirectory(out_dir, overwrite) if out_dir is not None else None
    clean = CleanData(dataset.x_train[idx], dataset.y_train[idx], dataset.num_classes)
    start = time.perf_counter()
    if before is None:
        before = evaluate(model, dataset, attack, device=device)
    result = defense_cls().run(model, clean, config, device=device, progress=progress)
    after = evaluate(result.model, dataset, attack, device=device)
    report = dict(result.report)
    report["metrics"] = {"before": before, "after": after}
    if attack is not None:
        report["metrics"]["der"] = defense_effectiveness_rating(before, after)
    if getattr(result.model, "flags_triggered_inputs", False):
        report["metrics"]["test_time_detection"] = detection_rates(result.model, dataset, attack, device=device)
    report["total_seconds"] = round(time.perf_counter() - start, 3)
    report["memory_method"] = MEMORY_METHOD
    report["environment"] = environment(device, seed=report.get("config", {}).get("seed"))
    if results is not None:
        with results as out:
            if model_spec is not None:
                save_repaired(out, result.model, model_spec, method, result.inserted, None, source, result.wrapper)
            report["plots"] = _draw_plots(result.plots, out)
            (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, result


def _draw_plots(plots: dict, out: Path) -> list[str]:
    """Draws what it can; a missing matplotlib skips the plots (noted in the report), never the results."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["skipped: matplotlib is not installed"]
    return [name for name, draw in plots.items() if draw(out / name) is not False]


def summary_row(name: str, report: dict) -> list[str]:
    m = report["metrics"]
    b, a = m["before"], m["after"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    peaks = [p["peak_bytes"] for p in report.get("phases", {}).values() if p["peak_bytes"] is not None]
    row = [name, f"{pct(b['acc'])} → {pct(a['acc'])}"]
    if "asr" in b:
        row += [f"{pct(b['asr'])} → {pct(a['asr'])}", f"{pct(b['ra'])} → {pct(a['ra'])}", f"{m['der']:.3f}"]
    else:
        row += ["–", "–", "–"]
    row += [f"{report['total_seconds']:.1f}", f"{max(peaks) / 2**20:.1f}" if peaks else "–"]
    return row


SUMMARY_HEADER = ["defense", "ACC %", "ASR %", "RA %", "DER", "time s", "peak MiB"]


def format_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
