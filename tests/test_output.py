"""Result directories are written whole or not at all, and replaced only when asked."""
import pytest

from pydefend.output import OutputError, ResultDirectory


def test_results_appear_only_when_complete(tmp_path):
    out = tmp_path / "results"
    with ResultDirectory(out) as staging:
        (staging / "report.json").write_text("{}")
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert (out / "report.json").read_text() == "{}"


def test_existing_results_need_overwrite_and_are_then_replaced_entirely(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "plot-of-another-method.png").write_text("old")
    with pytest.raises(OutputError, match="already holds results: pass --overwrite"):
        ResultDirectory(out)
    with ResultDirectory(out, overwrite=True) as staging:
        (staging / "report.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_an_empty_directory_is_used_as_is(tmp_path):
    (tmp_path / "results").mkdir()
    with ResultDirectory(tmp_path / "results") as staging:
        (staging / "a").write_text("1")
    assert (tmp_path / "results" / "a").exists()


def test_a_failed_run_leaves_the_previous_results(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with ResultDirectory(out, overwrite=True) as staging:
            (staging / "repaired.safetensors").write_text("new weights")
            raise RuntimeError("killed half way")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert (out / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_an_unusable_directory_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        ResultDirectory(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot write results to"):
        ResultDirectory(tmp_path / "file" / "results")


def test_run_defense_writes_through_a_staging_directory(tmp_path, monkeypatch):
    """A run that fails while writing its results (here: drawing the plots) leaves the old results whole."""
    import torch
    from torch import nn

    from pydefend import defend
    from pydefend.data import Dataset

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = Dataset("toy", torch.rand(30, 1, 4, 4), torch.arange(30) % 3, torch.rand(9, 1, 4, 4),
                   torch.arange(9) % 3, 3)
    spec = {"source": "python", "name": "torch.nn:Identity", "args": {}}
    out = tmp_path / "out"
    config = defend.parse_overrides(defend.get_defense("unit").Config, ["steps=1"])
    defend.run_defense("unit", model, data, None, list(range(20)), config, progress=False, out_dir=out,
                       model_spec=spec)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"report.json", "repaired.json", "repaired.safetensors"} <= set(first)

    def broken(plots, where):
        raise OSError("disk full")
    monkeypatch.setattr(defend, "_draw_plots", broken)
    with pytest.raises(OSError, match="disk full"):
        defend.run_defense("unit", model, data, None, list(range(20)), config, progress=False, out_dir=out,
                           model_spec=spec, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
