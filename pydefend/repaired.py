"""Saving and loading repaired models: safetensors weights + JSON, never pickle.

A repaired model is the original architecture (rebuilt from its JSON model
spec, see pydefend.checkpoint) plus modules a defense inserted into its
traced graph, each described by the node it follows, its class and its
constructor arguments, optionally inside a wrapper module (BNA's test-time
rule) described by its class and arguments. `load_repaired` rebuilds
exactly that nn.Module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from . import graph, modelspec
from .output import sha256_of
from .checkpoint import (CheckpointError, _format_json, _is_safetensors, _looks_pickled, _refuse_pickle,
                         load_exact_state, read_description)

FORMAT = "pydefend-repaired"
# 2: repaired.json holds the SHA-256 of repaired.safetensors.
FORMAT_VERSION = 2
WEIGHTS_FILE = "repaired.safetensors"
META_FILE = "repaired.json"


def _insertable():
    from .ops.channel_clip import ChannelClip
    return {"ChannelClip": ChannelClip}


def _wrappers():
    from .defenses.bna import BNAModel
    return {"BNAModel": BNAModel}


def _construct(cls, description: dict, *args) -> nn.Module:
    """cls(*args, **description["args"]), with arguments a file may have got wrong reported as such."""
    arguments = description.get("args", {})
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{cls.__name__}'s recorded args must be an object, got {arguments!r:.200}")
    try:
        return cls(*args, **arguments)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot rebuild {cls.__name__} from its recorded args: {exc}") from exc


def _build_wrapper(model: nn.Module, wrapper: dict | None) -> nn.Module:
    if not wrapper:
        return model
    try:
        cls = _wrappers()[wrapper["class"]]
    except (KeyError, TypeError):
        raise CheckpointError(f"unknown wrapper {wrapper!r:.200}") from None
    return _construct(cls, wrapper, model)


def _build_inserted(model: nn.Module, inserted: list) -> nn.Module:
    if not inserted:
        return model
    if not (isinstance(inserted, list) and all(isinstance(e, dict) and isinstance(e.get("node"), str)
                                               for e in inserted)):
        raise CheckpointError("'inserted' must be a list of objects, each naming its 'node'")
    classes = _insertable()
    modules = {}
    for entry in inserted:
        try:
            cls = classes[entry.get("module")]
        except (KeyError, TypeError):
            raise CheckpointError(f"unknown inserted module {entry.get('module')!r:.200}") from None
        modules[entry["node"]] = _construct(cls, entry)
    return graph.insert_recorded(model, modules, inserted[0].get("via", "graph"))


def _check_weights_hash(directory: Path, meta: dict):
    """Weights written by another run than their description (an interrupted write, a copy over one file) are
    refused. Descriptions older than format 2 hold no hash."""
    if meta.get("format_version", 0) < 2:
        return
    expected = meta.get("weights_sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"{directory / META_FILE} lacks the weights_sha256 of {WEIGHTS_FILE}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    if sha256_of(weights) != expected:
        raise CheckpointError(f"{weights} is not the file {META_FILE} describes (its SHA-256 differs): the two were "
                              "written by different runs; run the defense again")


def save_repaired(directory, model: nn.Module, model_spec: dict, defense: str, inserted: list,
                  report: dict | None = None, source: dict | None = None, wrapper: dict | None = None) -> Path:
    """Write repaired.safetensors + repaired.json (and report.json when given) into directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "defense": defense, "model": model_spec,
            "inserted": inserted, "wrapper": wrapper, "source": source or {},
            "weights_sha256": sha256_of(directory / WEIGHTS_FILE)}
    (directory / META_FILE).write_text(_format_json(meta) + "\n")
    if report is not None:
        (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return directory


def load_repaired(path: str | os.PathLike, device="cpu", trust_code: bool = False) -> nn.Module:
    """The repaired model saved in `path`, in eval mode.

    A model defined by your own code (``path/to/file.py:NAME`` or ``package.module:NAME``) is rebuilt only with
    ``trust_code=True``: rebuilding it imports that code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    if directory.is_file():
        if not _is_safetensors(directory) and _looks_pickled(directory):
            _refuse_pickle(directory)
        directory = directory.parent
    if not (directory / META_FILE).exists():
        raise CheckpointError(f"{directory} holds no repaired model ({META_FILE} is missing)")
    meta = read_description(directory / META_FILE, FORMAT, FORMAT_VERSION)
    _check_weights_hash(directory, meta)
    model = _build_wrapper(_build_inserted(modelspec.build(meta["model"], trust_code), meta.get("inserted")),
                           meta.get("wrapper"))
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, FileNotFoundError) as exc:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from exc
    load_exact_state(model, state, directory / WEIGHTS_FILE)
    return model.to(device).eval()
