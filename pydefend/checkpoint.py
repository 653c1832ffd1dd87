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
    """Asked only of files that are not safetensors, whose first bytes are a header length and may read as
    anything."""
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
        if path.suffix.lower() in PICKLE_SUFFIXES or (not _is_safetensors(path) and _looks_pickled(path)):
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


# safetensors' own limit on the JSON header.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _is_safetensors(path: Path) -> bool:
    """Parses the header: 8 bytes of little-endian length, then that much JSON holding an object."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, "little")
        if not 2 <= length <= min(_MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
            return False
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
    return isinstance(header, dict)


def load_state_into(model: nn.Module, state: dict, source) -> nn.Module:
    """Loads `state` into the user's model (inside any logits adapter) with a precise error on mismatch."""
    load_exact_state(modelspec.inner(model), state, source)
    return model


def load_exact_state(target: nn.Module, state: dict, source):
    """Loads `state` into `target` when it holds exactly target's entries, shapes and kinds of number, with
    finite values where a fresh model has them."""
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
    for key, value in expected.items():
        loaded = state[key]
        if _number_kind(loaded) != _number_kind(value):
            raise CheckpointError(f"weights in {source}: {key} holds {loaded.dtype} where the model has "
                                  f"{value.dtype}; a {_number_kind(value)} tensor is needed")
        # Where a fresh model holds finite numbers, NaN or inf can only be damage (or an attack on the defense).
        if loaded.is_floating_point() and torch.isfinite(value).all() and not torch.isfinite(loaded).all():
            raise CheckpointError(f"weights in {source}: {key} contains NaN or infinite values")
    target.load_state_dict(state)


def _number_kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "boolean"
    if tensor.is_complex():
        return "complex"
    return "floating-point" if tensor.is_floating_point() else "integer"


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
    """meta.json, with every field pydefend reads checked: it may come from someone you do not trust."""
    directory = _resolve(path)
    file = directory / META_FILE
    meta = read_description(file, FORMAT, FORMAT_VERSION)
    seed = meta.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise CheckpointError(f"{file}: seed must be a non-negative integer, got {seed!r}")
    if meta.get("attack") is not None and not isinstance(meta["attack"], dict):
        raise CheckpointError(f"{file}: attack must be an object or null, got {type(meta['attack']).__name__}")
    indices = meta.get("clean_indices")
    if indices is not None and not (isinstance(indices, list) and all(_is_int(i) for i in indices)):
        raise CheckpointError(f"{file}: clean_indices must be a list of integers")
    if meta.get("dataset") is not None and not isinstance(meta["dataset"], str):
        raise CheckpointError(f"{file}: dataset must be a string, got {type(meta['dataset']).__name__}")
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict) and all(
            isinstance(data.get(split), (str, type(None))) for split in ("train", "test"))):
        raise CheckpointError(f"{file}: data must be an object with 'train' and 'test' strings (or null)")
    return meta


def read_description(file: Path, format: str, version: int) -> dict:
    """A JSON description (meta.json, repaired.json) of format `format` up to `version`, with a model spec."""
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{file} is nested too deeply to be a pydefend description") from None
    if not isinstance(meta, dict) or meta.get("format") != format:
        raise CheckpointError(f"{file} is not a {format} description")
    found = meta.get("format_version", 0)
    if not _is_int(found) or found < 0:
        raise CheckpointError(f"{file}: format_version must be a non-negative integer, got {found!r}")
    if found > version:
        raise CheckpointError(f"{file} uses {format} format {found}; this pydefend reads up to {version}: "
                              "upgrade pydefend")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{file} does not describe its model (no 'model' object)")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    model = modelspec.build(spec or meta["model"], trust_code=trust_code)
    load_state_into(model, load_weights(directory / WEIGHTS_FILE), directory)
    return model.to(device).eval(), meta
