"""Model specs: every source builds the model it names, sized by the data, and rebuilds it from the JSON."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pydefend import modelspec
from pydefend.modelspec import Logits, ModelSpecError, logits_of

USER_NET = str(Path(__file__).parent / "user_code" / "user_net.py") + ":UserNet"
DATA = SimpleNamespace(num_classes=4, in_channels=1, image_size=(16, 16))


def built(text, example=True, **options):
    spec = modelspec.complete(modelspec.parse(text, **options), DATA)
    model = modelspec.build(spec, trust_code=True, example=torch.rand(2, 1, 16, 16) if example else None)
    return spec, model


def test_logits_of_every_output_kind():
    logits = torch.randn(3, 4)
    assert logits_of(logits) is logits
    assert logits_of({"logits": logits, "hidden": None}) is logits
    assert logits_of((logits, torch.zeros(1))) is logits
    assert logits_of(SimpleNamespace(logits=logits)) is logits
    with pytest.raises(ModelSpecError, match="returned str; pydefend needs logits"):
        logits_of("no")


def test_pydefend_model_sized_by_the_data_and_rebuilt_from_json():
    spec, model = built("simple_cnn", width=4)
    assert spec == {"source": "pydefend", "name": "simple_cnn", "in_channels": 1, "num_classes": 4,
                    "image_size": [16, 16], "config": {"width": 4}, "output": "tensor"}
    again = modelspec.build(json.loads(json.dumps(spec)))
    again.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(again(x), model(x))
    with pytest.raises(ModelSpecError, match="unknown pydefend model 'alexnet'; known: .*simple_cnn"):
        modelspec.parse("alexnet")


def test_torchvision_and_timm_take_their_sizes():
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    spec, model = built("torchvision:resnet18", example=False)  # 3 channels, whatever the data
    assert spec["args"] == {"num_classes": 4} and model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    spec, model = built("timm:vit_tiny_patch16_224", image_size=16,
                        args={"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    assert spec["args"]["in_chans"] == 1 and spec["args"]["img_size"] == [16, 16]
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def test_hugging_face_from_a_config_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    patch_size=4, num_channels=1, image_size=16, num_labels=3,
                                    architectures=["ViTForImageClassification"])
    config.save_pretrained(tmp_path)
    spec, model = built(f"hf:{tmp_path}")
    assert spec["source"] == "transformers" and spec["name"] == "ViTForImageClassification"
    assert spec["config"]["hidden_size"] == 16  # the whole config is kept
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 3)  # its labels, not the data's count
    spec, model = built(f"hf:{tmp_path}", num_classes=4)  # --num-classes replaces them
    assert spec["output"] == "logits" and isinstance(model, Logits)  # ModelOutput -> .logits
    x = torch.rand(2, 1, 16, 16)
    assert model(x).shape == (2, 4) and torch.equal(model(x), model.model(x).logits)
    rebuilt = modelspec.build(json.loads(json.dumps(spec)))
    rebuilt.load_state_dict(model.state_dict())
    assert isinstance(rebuilt, Logits) and torch.equal(rebuilt(x), model(x))
    with pytest.raises(ModelSpecError, match="no config.json"):
        modelspec.parse(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(ModelSpecError, match="no class 'NoSuchModel'"):
        modelspec.parse("transformers:NoSuchModel")


def test_users_code_runs_only_when_trusted(tmp_path):
    spec = modelspec.complete(modelspec.parse(USER_NET, args={"hidden": 8}), DATA)
    assert spec["source"] == "python" and Path(spec["name"].rpartition(":")[0]).is_absolute()
    with pytest.raises(ModelSpecError, match="imports code only when you name it"):
        modelspec.build(spec)
    model = modelspec.build(spec, trust_code=True)
    assert model.conv1.out_channels == 8
    (tmp_path / "empty.py").write_text("")
    with pytest.raises(ModelSpecError, match="has no 'Net'"):
        modelspec.build(modelspec.parse(f"{tmp_path / 'empty.py'}:Net"), trust_code=True)
    with pytest.raises(ModelSpecError, match="with these arguments"):
        modelspec.build(modelspec.parse(USER_NET, args={"depth": 3}), trust_code=True)
    with pytest.raises(ModelSpecError, match="not an nn.Module"):
        modelspec.build(modelspec.parse("json:dumps", args={"obj": 1}), trust_code=True)


def test_a_model_that_cannot_take_the_data_says_so():
    spec = modelspec.complete(modelspec.parse("simple_cnn"), DATA)
    with pytest.raises(ModelSpecError, match=r"cannot take the data's images of shape \(3, 16, 16\)"):
        modelspec.build(spec, example=torch.rand(2, 3, 16, 16))


def test_unknown_source_in_a_spec():
    with pytest.raises(ModelSpecError, match="unknown model source 'keras'"):
        modelspec.build({"source": "keras", "name": "x"})
    with pytest.raises(ModelSpecError, match="lacks field"):
        modelspec.build({"source": "pydefend", "name": "simple_cnn"})
    assert isinstance(modelspec.inner(Logits(nn.Linear(2, 2))), nn.Linear)
