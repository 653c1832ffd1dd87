"""`pydefend defend`: a real run on a CI-sized checkpoint, and its error paths."""
import json

import numpy as np
import pytest
import torch

from pydefend.cli import main
from pydefend.repaired import load_repaired


@pytest.fixture(scope="module")
def checkpoint(tiny_backdoor):
    return tiny_backdoor["path"]


def test_defend_writes_report_plots_and_reloadable_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["defend", "--method", "unit", "--checkpoint", str(checkpoint), "--set", "steps=3",
                 "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "ASR %" in table and "unit" in table
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 3 and set(report["metrics"]) == {"before", "after", "der"}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == torch.get_num_threads()
    assert env["command"].startswith("pydefend defend --method unit --checkpoint ") and env["seed"] == 0
    assert {"pydefend", "triton", "python", "cpu", "cpu_capability"} <= set(env)
    assert report["plots"] == ["unit_tightening.png", "unit_bounds.png"]
    assert all((out / name).stat().st_size > 0 for name in report["plots"])
    model = load_repaired(out)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("argv,message", [
    (["defend", "--method", "unit", "--checkpoint", "/no/such/dir"], "checkpoint not found"),
    (["defend", "--method", "unit", "--checkpoint", "{ckpt}", "--set", "steps=many"], "bad value for steps"),
    (["defend", "--method", "unit", "--checkpoint", "{ckpt}", "--set", "nonsense=1"], "bad setting"),
    (["defend", "--method", "unit", "--checkpoint", "{ckpt}", "--preset", "fastest"], "has no preset"),
    (["defend", "--method", "nothing", "--checkpoint", "{ckpt}"], "invalid choice"),
    (["defend", "--method", "unit"], "--checkpoint DIR"),
])
def test_defend_errors_are_one_line(checkpoint, argv, message, capsys):
    assert main([a.format(ckpt=checkpoint) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_pickled_checkpoint_is_refused(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    assert main(["defend", "--method", "unit", "--checkpoint", str(tmp_path / "model.pt")]) == 2
    assert "pickle" in capsys.readouterr().err


@pytest.fixture
def class_folders(tmp_path):
    """Image folders of 12 classes, more than the digits model's 10 outputs."""
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng()
    for split in ("train", "test"):
        for label in range(12):
            folder = tmp_path / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            for i in range(2):
                image_module.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("case", ["pickled_model", "missing_class", "wrong_num_classes", "folder_classes",
                                  "data_code_in_checkpoint"])
def test_bad_model_and_data_input_is_one_line_exit_2_nothing_written(case, checkpoint, class_folders, tmp_path,
                                                                      capsys):
    weights = str(checkpoint / "model.safetensors")
    model = ["--model", "preact_resnet18", "--width", "8"]
    data = ["--data", "digits"]
    if case == "pickled_model":
        torch.save(_loaded(checkpoint), tmp_path / "whole.pt")
        weights, message = str(tmp_path / "whole.pt"), "state_dict"
    elif case == "missing_class":
        (tmp_path / "net.py").write_text("import torch\n")
        model, message = ["--model", f"{tmp_path / 'net.py'}:Net"], "has no 'Net'"
    elif case == "wrong_num_classes":
        model, message = model + ["--num-classes", "7"], "shape"
    elif case == "folder_classes":
        data = ["--data", str(class_folders / "train"), "--test-data", str(class_folders / "test")]
        message = "sized for the 12 classes"
    else:
        meta_path = tmp_path / "ck" / "meta.json"
        meta_path.parent.mkdir()
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["data"] = {"train": "evil_module:make", "test": "evil_module:make"}
        meta_path.write_text(json.dumps(meta))
        (tmp_path / "ck" / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
        argv = ["defend", "--method", "unit", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]
        message = "imports code only when you name it"
    if case != "data_code_in_checkpoint":
        argv = ["defend", "--method", "unit", *model, "--weights", weights, *data, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not (tmp_path / "out").exists()


def _loaded(path):
    from pydefend.checkpoint import load_checkpoint
    return load_checkpoint(path)[0]
