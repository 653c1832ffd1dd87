"""Model specs: the JSON from which pydefend rebuilds a model, whichever library defines it.

``--model`` (and ``model_spec_from``) takes one of:

- ``NAME`` or ``pydefend:NAME``: pydefend's own models (``preact_resnet18``, ``vit``, ...), sized by the data;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=, in_chans=, img_size=)``;
- ``transformers:CLASS``: a Hugging Face class (``ViTForImageClassification``) built from its config, whose
  fields come from ``--model-args``; ``hf:DIR`` reads the config from a directory's ``config.json``;
- ``path/to/file.py:NAME`` or ``package.module:NAME``: a class or factory of yours, called with ``--model-args``.

No weights are ever downloaded: pretrained flags are off, and weights come from ``--weights``. The spec records
everything needed to rebuild the model later (a Hugging Face config is stored whole). Code of your own runs only
when you name it (``trust_code=True``): a spec read from a checkpoint or repaired model someone else wrote may
name library models, never a file or module to import.

A model whose forward returns a ``ModelOutput``, a dict with ``"logits"`` or a tuple is wrapped in
:class:`Logits`, the one place pydefend adapts outputs to logits. The spec records the adaptation.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .models import MODELS, build_model

SOURCES = ("pydefend", "torchvision", "timm", "transformers", "python")


class ModelSpecError(ValueError):
    """A model cannot be described or rebuilt from its description."""


class Logits(nn.Module):
    """model(x) reduced to its logits: ``.logits`` (Hugging Face), ``["logits"]`` or the first of a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits_of(self.model(x))


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):  # ModelOutput is a dict
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelSpecError(f"the model returned {type(output).__name__}; pydefend needs logits: a tensor, an object "
                         "with .logits, a dict with 'logits' or a tuple starting with them")


def parse(text: str, *, num_classes: int | None = None, in_channels: int | None = None, image_size=None,
          width: int | None = None, args: dict | None = None) -> dict:
    """The spec for a ``--model`` string; data-dependent sizes may be None until :func:`complete` fills them."""
    args = dict(args or {})
    source, sep, name = text.partition(":")
    if sep and source not in ("pydefend", "torchvision", "timm", "transformers", "hf"):
        location, _, attr = text.rpartition(":")  # "path/to/file.py:Net" or "package.module:make"
        if location.endswith(".py"):
            location = str(Path(location).resolve())
        return {"source": "python", "name": f"{location}:{attr}", "args": args}
    if not sep:
        source, name = "pydefend", text
    if source == "pydefend":
        if name not in MODELS:
            raise ModelSpecError(f"unknown pydefend model {name!r}; known: {', '.join(sorted(MODELS))} (or use "
                                 "torchvision:NAME, timm:NAME, transformers:CLASS, hf:DIR or file.py:NAME)")
        config = {**({"width": width} if width is not None else {}), **args}
        return {"source": "pydefend", "name": name, "in_channels": in_channels, "num_classes": num_classes,
                "image_size": list(_pair(image_size)) if image_size is not None else None, "config": config}
    if source == "torchvision":
        return {"source": source, "name": name, "args": {**_given(num_classes=num_classes), **args}}
    if source == "timm":
        sizes = _given(num_classes=num_classes, in_chans=in_channels,
                       img_size=list(_pair(image_size)) if image_size is not None else None)
        return {"source": source, "name": name, "args": {**sizes, **args}}
    transformers = _import("transformers", "transformers")
    if source == "hf":
        config_file = Path(name) / "config.json"
        if not config_file.is_file():
            raise ModelSpecError(f"hf:{name}: no config.json in that directory")
        config = transformers.AutoConfig.from_pretrained(str(Path(name)), local_files_only=True)
        classes = config.architectures or []
        if not classes:
            raise ModelSpecError(f"hf:{name}: config.json names no architectures; use transformers:CLASS")
        name, config = classes[0], config.to_dict()
    else:
        config = args
    if num_classes is not None:  # the label names of another class count would override it
        config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    config = {**config, **_given(num_labels=num_classes, num_channels=in_channels,
                                 image_size=image_size if isinstance(image_size, int) or image_size is None
                                 else list(_pair(image_size)))}
    if not hasattr(transformers, name):
        raise ModelSpecError(f"transformers has no class {name!r}")
    return {"source": "transformers", "name": name, "config": config}


def complete(spec: dict, dataset) -> dict:
    """Fills the sizes the command line left open from the data: classes and input channels for every source,
    and the image size for pydefend's models and Hugging Face configs (timm takes --img-size explicitly, since
    not every timm model has one)."""
    spec = json.loads(json.dumps(spec))
    classes, channels, size = dataset.num_classes, dataset.in_channels, list(dataset.image_size)
    if spec["source"] == "pydefend":
        for key, value in (("in_channels", channels), ("num_classes", classes), ("image_size", size)):
            if spec.get(key) is None:
                spec[key] = value
    elif spec["source"] == "torchvision":
        spec["args"].setdefault("num_classes", classes)
    elif spec["source"] == "timm":
        spec["args"].setdefault("num_classes", classes)
        spec["args"].setdefault("in_chans", channels)
    elif spec["source"] == "transformers":
        config = spec["config"]
        if "id2label" not in config:  # a saved config names its labels, which fix their count
            config.setdefault("num_labels", classes)
        config.setdefault("num_channels", channels)
        config.setdefault("image_size", size[0] if size[0] == size[1] else size)
    return spec


def build(spec: dict, trust_code: bool = False, example: torch.Tensor | None = None) -> nn.Module:
    """The model a spec describes, with random weights, in eval mode.

    With ``example`` (one input batch) the output is probed once and the spec gets ``"output"``: how it is
    adapted to logits. Without it the recorded adaptation is applied.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ModelSpecError(f"a model description is an object with a 'name' string, got {str(spec)[:200]}")
    for field in ("config", "args"):
        if not isinstance(spec.get(field, {}), dict):
            raise ModelSpecError(f"the model description's {field!r} must be an object, got {spec[field]!r:.200}")
    source = spec.get("source", "pydefend")
    if source != "python":  # the user's own code runs once only: it is trusted and sized by its author
        _check_size(spec, source)
    model = _construct(spec, source, trust_code)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec.get('name')} returned {type(model).__name__}, not an nn.Module")
    model.eval()
    if example is not None:
        with torch.no_grad():
            try:
                output = model(example)
            except Exception as exc:  # the user's model meets the user's data: say which and why
                raise ModelSpecError(f"{source}:{spec.get('name')} cannot take the data's images of shape "
                                     f"{tuple(example.shape[1:])}: {type(exc).__name__}: {exc}") from exc
        logits_of(output)
        spec["output"] = "tensor" if isinstance(output, torch.Tensor) else "logits"
    return Logits(model) if spec.get("output", "tensor") == "logits" else model


def _check_size(spec: dict, source: str):
    """A description may come from someone you do not trust: the model is first built without memory (on torch's
    meta device) and refused when its weights alone would not fit in this machine's memory."""
    try:
        with torch.device("meta"):
            model = _construct(spec, source, trust_code=False)
    except Exception:  # bad arguments, or a model that needs real tensors to build: the real build says which
        return
    if not isinstance(model, nn.Module):
        return
    tensors = list(model.parameters()) + list(model.buffers())
    size = sum(t.numel() * t.element_size() for t in tensors)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:
        raise ModelSpecError(f"{source}:{spec['name']} as described would hold {size / 2**30:,.1f} GiB of weights, "
                             f"more than this machine's {memory / 2**30:,.1f} GiB of memory: check its sizes "
                             f"({json.dumps(spec.get('config') or spec.get('args') or {})[:200]})")


def _construct(spec: dict, source: str, trust_code: bool) -> nn.Module:
    try:
        if source == "pydefend":
            model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], tuple(spec["image_size"]),
                                **spec.get("config", {}))
        elif source == "torchvision":
            models = _import("torchvision.models", "torchvision")
            model = models.get_model(spec["name"], weights=None, **spec.get("args", {}))
        elif source == "timm":
            timm = _import("timm", "timm")
            model = timm.create_model(spec["name"], pretrained=False, **spec.get("args", {}))
        elif source == "transformers":
            transformers = _import("transformers", "transformers")
            cls = getattr(transformers, spec["name"], None)
            if cls is None or not hasattr(cls, "config_class"):
                raise ModelSpecError(f"transformers has no model class {spec['name']!r}")
            model = cls(cls.config_class(**spec.get("config", {})))
        elif source == "python":
            if not trust_code:
                raise ModelSpecError(f"the model is defined by code ({spec['name']}); pydefend imports code only "
                                     "when you name it yourself: pass --model (or trust_code=True) if you trust it")
            model = _load_code(spec["name"])(**spec.get("args", {}))
        else:
            raise ModelSpecError(f"unknown model source {source!r}; known: {', '.join(SOURCES)}")
    except KeyError as exc:
        raise ModelSpecError(f"model description lacks field {exc.args[0]!r}: {json.dumps(spec)[:300]}") from exc
    except ModelSpecError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # sizes or arguments the class refuses
        raise ModelSpecError(f"cannot build {source}:{spec.get('name')} with these arguments: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return model


def inner(model: nn.Module) -> nn.Module:
    """The user's model inside a :class:`Logits` adapter (its weights are the user's state dict)."""
    return model.model if isinstance(model, Logits) else model


def _pair(size):
    if isinstance(size, int):
        return size, size
    return tuple(int(s) for s in size)


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelSpecError(f"this model needs {package}: pip install {package} ({exc})") from exc


def _load_code(target: str):
    """A class or factory from 'path/to/file.py:NAME' or 'package.module:NAME'."""
    location, _, attr = target.rpartition(":")
    if not location or not attr:
        raise ModelSpecError(f"cannot read {target!r}: expected path/to/file.py:NAME or package.module:NAME")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ModelSpecError(f"no such file: {path}")
        name = f"pydefend_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise ModelSpecError(f"cannot import {location}: {exc}") from exc
    if not hasattr(module, attr):
        raise ModelSpecError(f"{location} has no {attr!r}")
    return getattr(module, attr)
