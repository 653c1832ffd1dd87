"""The CLI's contract on hostile or broken input: exit status 2, one line on stderr, no traceback, nothing written.

Each case builds its malformed input in a fresh directory (the checkpoint, its meta.json, a data file or an
argument) and runs ``pydefend`` in-process; one case runs it as a real process to check the exit status itself.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DIGITS_CHECKPOINT
from pydefend import cli


def _meta(directory):
    return json.loads((directory / "meta.json").read_text())


def _write_meta(directory, meta):
    (directory / "meta.json").write_text(json.dumps(meta))


def _edit_meta(**changes):
    def setup(work):
        meta = _meta(work / "ckpt")
        for key, value in changes.items():
            if value is _DROP:
                meta.pop(key)
            else:
                meta[key] = value
        _write_meta(work / "ckpt", meta)
        return ["defend", "--method", "unit", "--checkpoint", "ckpt"]
    return setup


_DROP = object()


def _edit_model_config(**config):
    def setup(work):
        meta = _meta(work / "ckpt")
        meta["model"]["config"].update(config)
        _write_meta(work / "ckpt", meta)
        return ["defend", "--method", "unit", "--checkpoint", "ckpt"]
    return setup


def _edit_weights(change):
    def setup(work):
        path = work / "ckpt" / "model.safetensors"
        state = load_file(str(path))
        save_file({key: change(key, value) for key, value in state.items()}, str(path))
        return ["defend", "--method", "unit", "--checkpoint", "ckpt"]
    return setup


def _nested(depth):
    return "[" * depth + "]" * depth


def _deep_meta(work):
    (work / "ckpt" / "meta.json").write_text('{"format": "pydefend-checkpoint", "model": ' + _nested(100_000) + "}")
    return ["defend", "--method", "unit", "--checkpoint", "ckpt"]


def _pickled_weights(work):
    torch.save({"conv.weight": torch.zeros(1)}, work / "ckpt" / "model.safetensors")
    return ["defend", "--method", "unit", "--checkpoint", "ckpt"]


def _truncated_weights(work):
    path = work / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return ["defend", "--method", "unit", "--checkpoint", "ckpt"]


def _digits_npz(work, name="data.npz", channels=1, labels=None, **arrays):
    """The checkpoint's own digits images (8×8, one channel) as a .npz, altered as asked."""
    rng = np.random.default_rng(0)
    x = rng.random((40, channels, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 40) if labels is None else labels
    contents = {"x_train": x, "y_train": y, "x_test": x, "y_test": y, **arrays}
    np.savez(work / name, **contents)
    return name


def _with_data(**npz):
    def setup(work):
        return ["defend", "--method", "unit", "--checkpoint", "ckpt", "--data", _digits_npz(work, **npz)]
    return setup


def _empty_npz(work):
    np.savez(work / "empty.npz")
    return ["defend", "--method", "unit", "--checkpoint", "ckpt", "--data", "empty.npz"]


def _empty_file(work):
    (work / "zero.npz").write_bytes(b"")
    return ["defend", "--method", "unit", "--checkpoint", "ckpt", "--data", "zero.npz"]


def _args(*argv):
    return lambda work: list(argv)


def _defend(*argv):
    return _args("defend", "--checkpoint", "ckpt", *argv)


def _weights_run(*argv):
    def setup(work):
        return ["defend", "--method", "unit", "--model", "preact_resnet18", "--weights",
                "ckpt/model.safetensors", "--data", "digits", *argv]
    return setup


CASES = {
    # meta.json
    "meta without model": _edit_meta(model=_DROP),
    "format_version as string": _edit_meta(format_version="1"),
    "seed as string": _edit_meta(seed="0"),
    "seed negative": _edit_meta(seed=-1),
    "clean_indices out of range": _edit_meta(clean_indices=[0, 1, 10**9]),
    "clean_indices repeated": _edit_meta(clean_indices=[3] * 50),
    "clean_indices not integers": _edit_meta(clean_indices=[0.5, 1.5]),
    "clean_indices one": _edit_meta(clean_indices=[3]),
    "attack not an object": _edit_meta(attack="badnets"),
    "attack unknown field": _edit_meta(attack={"name": "badnets", "colour": 3}),
    "data outside": _edit_meta(data={"train": "/etc", "test": None}),
    "data names code": _edit_meta(data={"train": "os:getcwd", "test": None}),
    "data not strings": _edit_meta(data={"train": 5, "test": None}),
    "meta not JSON": lambda work: ((work / "ckpt" / "meta.json").write_text("{'format':"),
                                   ["defend", "--method", "unit", "--checkpoint", "ckpt"])[1],
    "meta nested 100,000 deep": _deep_meta,
    "model width negative": _edit_model_config(width=-3),
    "model width text": _edit_model_config(width="abc"),
    "model width huge": _edit_model_config(width=10**6),
    "model unknown option": _edit_model_config(colour=1),
    # weights
    "bool weights": _edit_weights(lambda key, value: value != 0),
    "int64 weights": _edit_weights(lambda key, value: value.long()),
    "NaN weights": _edit_weights(lambda key, value: torch.full_like(value, float("nan"))
                                 if value.is_floating_point() else value),
    "pickled weights": _pickled_weights,
    "truncated weights": _truncated_weights,
    # data
    "labels beyond the model's classes": _with_data(labels=np.arange(40) % 12),
    "label 1e12": _with_data(labels=np.full(40, 10**12)),
    "3-channel data for a 1-channel model": _with_data(channels=3),
    "empty npz": _empty_npz,
    "empty file": _empty_file,
    "NaN images": _with_data(x_test=np.full((40, 1, 8, 8), np.nan, dtype=np.float32)),
    "resize too large": _defend("--method", "unit", "--data", "digits@100000"),
    # arguments
    "--set betas=5": _defend("--method", "unit", "--set", "betas=5"),
    "--set batch_size=-3": _defend("--method", "unit", "--set", "batch_size=-3"),
    "--set epsilon=nan": _defend("--method", "unit", "--set", "epsilon=nan"),
    "--set lr=inf": _defend("--method", "unit", "--set", "lr=inf"),
    "--set unknown key": _defend("--method", "unit", "--set", "colour=3"),
    "--set nested 100,000 deep": _defend("--method", "unit", "--set", "betas=" + _nested(100_000)),
    "--preset __init__": _defend("--method", "unit", "--preset", "__init__"),
    "--preset unknown": _defend("--method", "tsbd", "--preset", "fastest"),
    "--device cuda without a GPU": _defend("--method", "unit", "--device", "cuda"),
    "--device unknown": _defend("--method", "unit", "--device", "gpu0"),
    "--threads 0": _defend("--method", "unit", "--threads", "0"),
    "--model-args nested 100,000 deep": _weights_run("--model-args", '{"a": ' + _nested(100_000) + "}"),
    "--width negative": _weights_run("--width", "-3"),
    "--width text": _weights_run("--width", "abc"),
    "--width huge": _weights_run("--width", "1000000"),
    "--weights of another width": _weights_run("--width", "16"),
    "--out holds results": lambda work: ((work / "old").mkdir(), (work / "old" / "report.json").write_text("{}"),
                                         ["defend", "--method", "unit", "--checkpoint", "ckpt", "--out", "old"])[2],
    "--out is a file": lambda work: ((work / "taken").write_text("mine"),
                                     ["defend", "--method", "unit", "--checkpoint", "ckpt", "--out", "taken"])[1],
    "--out under a file": lambda work: ((work / "taken").write_text("mine"),
                                        ["defend", "--method", "unit", "--checkpoint", "ckpt", "--out", "taken/x"])[1],
    "demo --out holds results": lambda work: ((work / "old").mkdir(), (work / "old" / "summary.json").write_text("{}"),
                                              ["demo", "--out", "old"])[2],
    "attack --lr nan": _args("attack", "--attack", "badnets", "--lr", "nan", "--epochs", "1", "--out", "new"),
    "attack --lr -1": _args("attack", "--attack", "badnets", "--lr", "-1", "--epochs", "1", "--out", "new"),
    "attack --target beyond the classes": _args("attack", "--attack", "badnets", "--target", "10", "--epochs", "1",
                                                "--out", "new"),
    "attack --seed negative": _args("attack", "--attack", "badnets", "--seed", "-5", "--out", "new"),
}

GPU_CASES = {"--device cuda without a GPU"}


@pytest.fixture
def work(tmp_path, monkeypatch):
    shutil.copytree(DIGITS_CHECKPOINT, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line_with_exit_2_and_nothing_written(case, work, capsys):
    if case in GPU_CASES and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    argv = CASES[case](work)
    before = _listing(work)
    status = cli.main(argv + ["--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0], err
    assert "Traceback" not in err
    assert _listing(work) == before, "the refused command wrote files"


def test_exit_status_of_the_real_process(work):
    _edit_meta(seed="zero")(work)
    result = subprocess.run([sys.executable, "-m", "pydefend", "defend", "--method", "unit", "--checkpoint", "ckpt"],
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "seed" in result.stderr
    assert not (work / "defended-unit").exists()


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """A UNIT-repaired digits model, saved: one inserted ChannelClip per activation."""
    from pydefend.defenses import UNIT, UNITConfig
    from pydefend.repaired import save_repaired
    from conftest import load_fixed_backdoor

    fixed = load_fixed_backdoor(DIGITS_CHECKPOINT)
    result = UNIT().run(fixed["model"], fixed["clean"], UNITConfig(steps=1), progress=False)
    directory = tmp_path_factory.mktemp("repaired")
    save_repaired(directory, result.model, fixed["spec"], "unit", result.inserted, result.report)
    return directory


def _edit_repaired(change):
    def edit(directory):
        meta = json.loads((directory / "repaired.json").read_text())
        change(meta)
        (directory / "repaired.json").write_text(json.dumps(meta))
    return edit


def _edit_repaired_weights(change, rehash=True):
    """Changes the weights; with `rehash` the description is updated to match, as an attacker would."""
    def edit(directory):
        from pydefend.output import sha256_of

        path = directory / "repaired.safetensors"
        state = load_file(str(path))
        save_file({key: change(key, value) for key, value in state.items()}, str(path))
        if rehash:
            _edit_repaired(lambda m: m.update(weights_sha256=sha256_of(path)))(directory)
    return edit


REPAIRED_CASES = {
    "nested 100,000 deep": lambda d: (d / "repaired.json").write_text('{"a": ' + _nested(100_000) + "}"),
    "format_version as string": _edit_repaired(lambda m: m.update(format_version="1")),
    "no model": _edit_repaired(lambda m: m.pop("model")),
    "inserted not a list": _edit_repaired(lambda m: m.update(inserted="all")),
    "inserted unknown module": _edit_repaired(lambda m: m["inserted"][0].update(module="os.system")),
    "inserted args wrong": _edit_repaired(lambda m: m["inserted"][0].update(args={"colour": 1})),
    "inserted args not an object": _edit_repaired(lambda m: m["inserted"][0].update(args=[1])),
    "unknown wrapper": _edit_repaired(lambda m: m.update(wrapper={"class": "Popen", "args": {}})),
    "NaN weights": _edit_repaired_weights(lambda k, v: torch.full_like(v, float("nan")) if "stem" in k else v),
    "int64 weights": _edit_repaired_weights(lambda k, v: v.long() if "stem" in k else v),
    "weights of another run": _edit_repaired_weights(lambda k, v: v * 1.01, rehash=False),
    "no weights hash": _edit_repaired(lambda m: m.pop("weights_sha256")),
}


@pytest.mark.parametrize("case", sorted(REPAIRED_CASES))
def test_hostile_repaired_descriptions_are_refused(case, repaired, tmp_path):
    from pydefend.checkpoint import CheckpointError
    from pydefend.repaired import load_repaired

    directory = tmp_path / "copy"
    shutil.copytree(repaired, directory)
    load_repaired(directory)  # the untouched copy loads
    REPAIRED_CASES[case](directory)
    with pytest.raises(CheckpointError) as info:
        load_repaired(directory)
    assert "\n" not in str(info.value)
