import json
import pickle

import pytest
import torch

from pydefend.attacks import Blended
from pydefend.checkpoint import (CheckpointError, UnsafeCheckpointError, load_checkpoint, load_meta,
                                 model_spec, save_checkpoint)
from pydefend.models import build_model


def trained_like_model(spec):
    model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], spec["image_size"],
                        **spec["config"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.train()
    model(torch.rand(8, spec["in_channels"], *spec["image_size"]))  # moves BN running statistics
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    spec = model_spec("preact_resnet18", 1, 10, 12, {"width": 4})
    model = trained_like_model(spec)
    attack = Blended((1, 12, 12), 10, seed=3)
    directory = save_checkpoint(tmp_path / "ckpt", model, spec, dataset="toy", attack=attack.to_dict(),
                                seed=3, clean_indices=torch.tensor([4, 8, 15]),
                                metrics={"acc": 0.9, "asr": 0.99, "ra": 0.01}, train_time_s=1.5)
    return directory, model, attack


def test_round_trip_gives_identical_outputs(saved, monkeypatch):
    directory, model, attack = saved

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    restored, meta = load_checkpoint(directory)
    x = torch.rand(5, 1, 12, 12)
    assert not restored.training
    assert torch.equal(restored(x), model(x))
    assert meta["dataset"] == "toy" and meta["seed"] == 3 and meta["clean_indices"] == [4, 8, 15]
    assert meta["metrics"]["asr"] == 0.99 and meta["train_time_s"] == 1.5
    assert meta["environment"]["torch"] == torch.__version__
    restored_attack = Blended.from_dict(meta["attack"])
    assert torch.equal(restored_attack.apply(x), attack.apply(x))
    # Passing the weights file itself works too.
    assert torch.equal(load_checkpoint(directory / "model.safetensors")[0](x), model(x))


def test_meta_is_plain_readable_json(saved):
    directory, _, _ = saved
    text = (directory / "meta.json").read_text()
    meta = json.loads(text)
    assert meta["model"] == {"source": "pydefend", "name": "preact_resnet18", "in_channels": 1, "num_classes": 10,
                             "image_size": [12, 12], "config": {"width": 4}}
    assert '"clean_indices": [4, 8, 15]' in text


def test_refuses_torch_save_files(tmp_path):
    model = build_model("simple_cnn", 1, 3, 8, width=2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match="execute arbitrary code") as info:
        load_checkpoint(tmp_path / "model.pt")
    assert "safetensors" in str(info.value)
    # A directory holding only a pickle is refused with the same explanation.
    with pytest.raises(UnsafeCheckpointError, match="model.pt"):
        load_checkpoint(tmp_path)


def test_refuses_pickles_disguised_as_safetensors(saved):
    directory, model, _ = saved
    torch.save(model.state_dict(), directory / "model.safetensors")  # zip-wrapped pickle
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(directory)
    (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(directory)


def test_missing_and_mismatched_files(saved, tmp_path):
    directory, _, _ = saved
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
    meta = json.loads((directory / "meta.json").read_text())
    meta["model"]["config"]["width"] = 8
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(directory)
    meta["model"]["name"] = "simple_cnn"
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_meta(directory)
    (directory / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(directory)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    (directory / "meta.json").write_text(json.dumps({**meta, "model": saved_spec()}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(directory)


def saved_spec():
    return model_spec("preact_resnet18", 1, 10, 12, {"width": 4})



@pytest.mark.parametrize("header_length", [640, 896, 1152, 1408, 65536 + 640])
def test_safetensors_whose_header_length_reads_as_a_pickle_opcode(tmp_path, header_length):
    """A header length of 640 starts the file with bytes 0x80 0x02, pickle's PROTO 2: the file is still
    safetensors, and is read as such, directly or through its directory."""
    from safetensors.torch import save_file

    from pydefend.checkpoint import _resolve, load_weights

    path = tmp_path / "model.safetensors"
    state = {"weight": torch.randn(3, 2)}

    def header_with(padding):
        save_file(state, str(path), metadata={"pad": "x" * padding})
        return int.from_bytes(path.read_bytes()[:8], "little")

    base = header_with(0)
    lengths = {header_with(padding): padding for padding in range(header_length - base - 8, header_length - base + 8)}
    header_with(lengths[header_length])  # safetensors pads to 8 bytes, so every multiple of 8 is reachable
    assert path.read_bytes()[:2] == bytes([header_length % 256, header_length // 256 % 256])
    assert torch.equal(load_weights(path)["weight"], state["weight"])
    (tmp_path / "meta.json").write_text("{}")
    assert _resolve(path) == tmp_path
    assert _resolve(tmp_path) == tmp_path
