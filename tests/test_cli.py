import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pydefend.checkpoint import load_checkpoint
from pydefend.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attack_command_trains_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["attack", "--data", "digits", "--attack", "sig", "--model", "simple_cnn", "--width", "4",
                 "--epochs", "1", "--target", "3", "--rate", "0.05", "--seed", "2", "--out", str(out),
                 "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ASR" in printed and str(out) in printed
    model, meta = load_checkpoint(out)
    assert meta["attack"]["name"] == "sig" and meta["attack"]["target"] == 3
    assert meta["attack"]["rate"] == 0.05 and meta["seed"] == 2
    assert meta["model"]["config"] == {"width": 4} and meta["dataset"] == "digits"
    assert set(meta["metrics"]) == {"acc", "asr", "ra"}


def test_attack_command_on_user_npz(tmp_path, capsys):
    rng = np.random.default_rng()
    for split, count in (("user", 60), ("user_test", 12)):
        np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 256, (count, 10, 10), dtype=np.uint8),
                 y=np.arange(count) % 3)
    code = main(["attack", "--data", str(tmp_path / "user.npz"), "--test-data", str(tmp_path / "user_test.npz"),
                 "--attack", "badnets_all2all",
                 "--model", "simple_cnn", "--width", "2", "--epochs", "1", "--out", str(tmp_path / "ck"),
                 "--quiet"])
    assert code == 0
    _, meta = load_checkpoint(tmp_path / "ck")
    assert meta["dataset"] == "user" and meta["model"]["image_size"] == [10, 10]
    # The data is recorded by absolute path, so `defend --checkpoint` finds it from any directory.
    assert meta["data"] == {"train": str(tmp_path / "user.npz"), "test": str(tmp_path / "user_test.npz")}


def test_zoo_command_prints_a_table(tmp_path, capsys):
    code = main(["zoo", "--data", "digits", "--attacks", "badnets", "blended", "clean", "--model", "simple_cnn",
                 "--width", "4", "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["attack", "ACC", "ASR", "RA", "time", "(s)"]
    assert [line.split()[0] for line in lines[1:]] == ["badnets", "blended", "clean"]
    assert lines[3].split()[2:4] == ["–", "–"]  # a clean model has no ASR or RA
    assert len(list(tmp_path.iterdir())) == 3
    _, meta = load_checkpoint(next(tmp_path.glob("*-clean-*")))
    assert meta["attack"] is None and set(meta["metrics"]) == {"acc"}


@pytest.mark.parametrize("argv,message", [
    (["attack", "--attack", "trojan"], "invalid choice"),
    (["attack", "--data", "digits"], "--attack"),
    (["attack", "--attack", "badnets", "--data", "missing.npz"], "missing.npz"),
    (["attack", "--attack", "badnets", "--data", "no_such_thing"], "unknown dataset"),
    (["attack", "--attack", "badnets", "--rate", "1.5"], "between 0 and 1"),
    (["attack", "--attack", "badnets", "--target", "12", "--epochs", "1"], "target class 12"),
    (["zoo", "--model", "alexnet"], "invalid choice"),
    (["zoo", "--threads", "0"], "positive integer"),
    (["zoo", "--epochs", "many"], "positive integer, got 'many'"),
    ([], "required"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


def test_parser_lists_subcommands():
    text = build_parser().format_help()
    assert "attack" in text and "zoo" in text


def test_module_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "pydefend", "attack", "--attack", "nope"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "invalid choice" in result.stderr
