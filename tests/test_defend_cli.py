"""`pydefend defend`: a real run on a CI-sized checkpoint, and its error paths."""
import json

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
    (["defend", "--method", "unit"], "required"),
])
def test_defend_errors_are_one_line(checkpoint, argv, message, capsys):
    assert main([a.format(ckpt=checkpoint) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_pickled_checkpoint_is_refused(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    assert main(["defend", "--method", "unit", "--checkpoint", str(tmp_path / "model.pt")]) == 2
    assert "pickle" in capsys.readouterr().err
