"""Model checkpoints as ``model.safetensors`` + ``meta.json`` in one directory.

A backdoored model comes from someone you do not trust, and unpickling a
PyTorch ``.pt``/``.pth`` file can execute arbitrary code. Checkpoints here hold
only tensors (safetensors) and JSON; pickled files are refused, never loaded.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from . import modelspec
from .environment import environment

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
FORMAT = "pydefend-checkpoint"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")

CONVERSION_HINT = (
    "convert it once, inside a sandbox you can throw away, with: "
    "state = torch.load(path, weights_only=True); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, 'model.safetensors')")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match its model."""


class UnsafeCheckpointError(CheckpointError):
    """The file is a pickle (or a zip-wrapped pickle, torch.save's format)."""


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive; plain pickles start with PROTO (0x80) + version.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _refuse_pickle(path: Path):
    raise UnsafeCheckpointError(
        f"refusing to load {path}: it is a pickled PyTorch file, and unpickling a file from an "
        f"untrusted model can execute arbitrary code. pydefend only loads safetensors weights; "
        f"{CONVERSION_HINT}")


def _resolve(path: str | os.PathLike) -> Path:
    """Checkpoint directory for ``path`` (a directory or its model.safetensors/meta.json)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(path):
            _refuse_pickle(path)
        if path.name not in (WEIGHTS_FILE, META_FILE):
            raise CheckpointError(f"{path} is not a pydefend checkpoint: pass the directory holding "
                                  f"{WEIGHTS_FILE} and {META_FILE}")
        path = path.parent
    weights, meta = path / WEIGHTS_FILE, path / META_FILE
    if not weights.exists():
        pickles = sorted(p.name for p in path.iterdir()
                         if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(path / pickles[0])
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    if not meta.exists():
        raise CheckpointError(f"{path} has no {META_FILE} (it says how to rebuild the model)")
    if not _is_safetensors(weights) and _looks_pickled(weights):
        _refuse_pickle(weights)
    return path


def _format_json(value, indent: int = 0) -> str:
    """Indented JSON for dicts, one line for lists of numbers (index lists, patterns)."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_format_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [pad + _format_json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value)


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def model_spec(name: str, in_channels: int, num_classes: int, image_size, config: dict | None = None) -> dict:
    """The spec of one of pydefend's own models (see pydefend.modelspec for the others)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return {"source": "pydefend", "name": name, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": [int(height), int(width)], "config": dict(config or {})}


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a .pt/.pth state dict read with torch.load(weights_only=True),
    which unpickles tensors and containers only, never code. A dict holding a "state_dict" entry is unwrapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if _is_safetensors(path):
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds more than tensors (a whole pickled model?), which pydefend never unpickles: save the "
            f"model's state_dict instead, torch.save(model.state_dict(), path)") from exc
    except Exception as exc:  # torch.load's errors for foreign files vary
        raise CheckpointError(f"cannot read {path} as safetensors or a torch state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _is_safetensors(path: Path) -> bool:
    """Parses the header: 8 bytes of little-endian length, then that much JSON."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + length <= path.stat().st_size


def load_state_into(model: nn.Module, state: dict, source) -> nn.Module:
    """Loads `state` into the user's model (inside any logits adapter) with a precise error on mismatch."""
    target = modelspec.inner(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
                   for key, value in expected.items() if key in state and state[key].shape != value.shape]
    if missing or unexpected or wrong_shape:
        details = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape (file vs model)", wrong_shape)):
            if items:
                shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                details.append(f"{label}: {shown}")
        raise CheckpointError(f"weights in {source} do not match the model {type(target).__name__}; "
                              + "; ".join(details))
    target.load_state_dict(state)
    return model


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, spec: dict, *,
                    dataset: str | None = None, data: dict | None = None, attack: dict | None = None,
                    seed: int | None = None,
                    clean_indices=None, metrics: dict | None = None,
                    train_time_s: float | None = None, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``meta.json`` into ``directory`` (created if needed).

    ``dataset`` is the data's display name; ``data`` the specs it loads from ({"train", "test"}), by default
    ``dataset`` itself (pydefend's named datasets carry their own test split).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in modelspec.inner(model).state_dict().items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": spec, "dataset": dataset, "data": data or {"train": dataset, "test": None},
        "attack": attack, "seed": seed,
        "clean_indices": None if clean_indices is None else [int(i) for i in clean_indices],
        "metrics": metrics, "train_time_s": train_time_s, "environment": environment(_device_of(model), seed=seed),
        **(extra or {}),
    }
    # Write the weights first: a directory with meta.json always has matching weights.
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / META_FILE).write_text(_format_json(meta) + "\n")
    return directory


def load_meta(path: str | os.PathLike) -> dict:
    directory = _resolve(path)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / META_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE} is not pydefend checkpoint metadata")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} uses checkpoint format {meta['format_version']}; this "
                              f"pydefend reads up to {FORMAT_VERSION}: upgrade pydefend")
    return meta


def data_spec(meta: dict) -> dict:
    """{"train", "test"}: the data a checkpoint was trained and evaluated on (older ones name only "dataset")."""
    data = meta.get("data")
    if isinstance(data, dict) and isinstance(data.get("train"), str):
        return {"train": data["train"], "test": data.get("test")}
    return {"train": meta.get("dataset"), "test": None}


def load_checkpoint(path: str | os.PathLike, device="cpu", spec: dict | None = None,
                    trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model described in ``meta.json`` (or by ``spec``) and load its safetensors weights.

    Returns (model in eval mode, metadata dict).
    """
    directory = _resolve(path)
    meta = load_meta(directory)
    if spec is None and not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{directory / META_FILE} does not describe its model")
    model = modelspec.build(spec or meta["model"], trust_code=trust_code)
    load_state_into(model, load_weights(directory / WEIGHTS_FILE), directory)
    return model.to(device).eval(), meta
