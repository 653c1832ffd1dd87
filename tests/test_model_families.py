"""Every defense on the model families users hold: torchvision, timm, Hugging Face and a class of their own,
through the CLI with --model/--weights and back through load_repaired."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pydefend.cli import main
from pydefend.data import load_dataset
from pydefend.repaired import load_repaired

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

USER_NET = str(Path(__file__).parent / "user_code" / "user_net.py") + ":UserNet"
HF_VIT = json.dumps({"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 64})
TIMM_VIT = json.dumps({"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
FAMILIES = {  # --model and its options; data: "gray" digits at 16×16, or "rgb" (torchvision's ResNets take 3)
    "torchvision": (["--model", "torchvision:resnet18"], "rgb"),
    "timm": (["--model", "timm:vit_tiny_patch16_224", "--img-size", "16", "--model-args", TIMM_VIT], "gray"),
    "transformers": (["--model", "transformers:ViTForImageClassification", "--model-args", HF_VIT], "gray"),
    "user": (["--model", USER_NET], "gray"),
}
TRAINING = {"user": ["--epochs", "6"],  # TSBD needs a model above chance to unlearn
            "timm": ["--optimizer", "adamw", "--lr", "0.003", "--epochs", "4"],
            "transformers": ["--optimizer", "adamw", "--lr", "0.003", "--epochs", "4"]}
LAYERS = {"timm": "LayerNorm", "transformers": "LayerNorm"}  # BNA's sites where there is no BatchNorm
QUICK = {  # enough to run every phase, not to judge efficacy (tests/test_<defense>.py do that)
    "unit": ["--set", "steps=2"],
    "bna": ["--set", "re_steps=20", "--set", "epochs=1", "--set", "threshold=0"],
    "tsbd": ["--set", "unlearn_lr=0.01", "--set", "finetune_epochs=1"],
    "unibp": ["--set", "rectify_epochs=1", "--set", "epochs=1"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    digits = load_dataset("digits@16x16")
    for name, channels in (("gray", 1), ("rgb", 3)):
        arrays = {f"x_{s}": getattr(digits, f"x_{s}").repeat(1, channels, 1, 1).numpy() for s in ("train", "test")}
        arrays.update({f"y_{s}": getattr(digits, f"y_{s}").numpy() for s in ("train", "test")})
        np.savez(root / f"{name}.npz", **arrays)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """trained(family): a briefly backdoored model of that family, trained once with `pydefend attack`."""
    cache = {}

    def checkpoint(family):
        if family not in cache:
            model_args, kind = FAMILIES[family]
            out = tmp_path_factory.mktemp(family)
            assert main(["attack", "--attack", "badnets", *model_args, "--data", str(data / f"{kind}.npz"),
                         "--epochs", "2", "--batch-size", "64", *TRAINING.get(family, []), "--out", str(out),
                         "--quiet"]) == 0, family
            cache[family] = out
        return cache[family]
    return checkpoint


@pytest.mark.parametrize("method", sorted(QUICK))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_defense_runs_on_the_family_through_the_cli(family, method, data, trained, tmp_path, capsys):
    model_args, kind = FAMILIES[family]
    out = tmp_path / "out"
    argv = ["defend", "--method", method, *model_args, "--weights", str(trained(family) / "model.safetensors"),
            "--data", str(data / f"{kind}.npz"), "--attack", "badnets", "--clean-fraction", "0.1",
            "--out", str(out), "--quiet", *QUICK[method]]
    if method == "bna" and family in LAYERS:
        argv += ["--set", f"layers={LAYERS[family]}"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]["before"]) == {"acc", "asr", "ra"}
    repaired = load_repaired(out, trust_code=family == "user")
    x = torch.from_numpy(np.load(data / f"{kind}.npz")["x_test"][:16])
    with torch.no_grad():
        logits = repaired(x)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    meta = json.loads((out / "repaired.json").read_text())
    assert meta["model"]["source"] == ("python" if family == "user" else family)
    if family == "transformers":
        assert meta["model"]["output"] == "logits"  # ModelOutput adapted to its logits
    if method == "unit":
        via = {s["via"] for s in meta["inserted"]}
        assert via == ({"modules"} if family == "transformers" else {"graph"}), via  # HF models do not trace
        kinds = {s["kind"] for s in report["sites"]}
        assert ("attention" in kinds) == (family in ("timm", "transformers")), kinds


def test_code_in_a_checkpoint_is_not_imported_unless_named(data, trained, capsys):
    assert main(["defend", "--method", "unit", "--checkpoint", str(trained("user")), "--set", "steps=1"]) == 2
    assert "pass --model" in capsys.readouterr().err
