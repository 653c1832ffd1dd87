"""Running a defense on a model and judging it: metrics before/after, DER,
report, plots and the repaired model on disk."""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path

import torch

from .defenses import CleanData, get_defense
from .environment import environment
from .metrics import defense_effectiveness_rating, detection_rates, evaluate
from .monitor import METHOD as MEMORY_METHOD
from .repaired import save_repaired


def parse_overrides(config_cls, pairs: list[str], preset: str | None = None):
    """A config from `--set key=value` strings (typed by the dataclass fields) and an optional preset."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad setting {pair!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
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
            raise ValueError(f"bad value for {key}: {text!r} (expected {getattr(kind, '__name__', kind)})") from None
    if preset is not None:
        factory = getattr(config_cls, preset, None)
        if not callable(factory):
            raise ValueError(f"{config_cls.__name__} has no preset {preset!r}")
        return factory(**values)
    return config_cls(**values)


def run_defense(method: str, model, dataset, attack, clean_indices, config=None, device="cpu",
                progress: bool = True, out_dir=None, model_spec: dict | None = None, source: dict | None = None,
                before: dict | None = None):
    """Returns (report dict, DefenseResult). Writes report, plots and model into out_dir when given.

    ``before``: the model's metrics on this dataset and attack, when already measured.
    """
    defense_cls = get_defense(method)
    idx = torch.as_tensor(clean_indices, dtype=torch.long)
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
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
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
