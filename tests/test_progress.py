"""One progress helper: a bar only on a terminal, the lines worth keeping everywhere (when enabled)."""
import io
import sys

from pydefend.progress import Progress


def test_off_a_terminal_only_written_lines_appear(capsys):
    progress = Progress(range(5), "loop")
    assert progress.bar is None and list(progress) == [0, 1, 2, 3, 4]
    progress.update()
    progress.set_postfix(loss="0.1")
    progress.write("epoch 1/1: loss 0.1")
    progress.close()
    captured = capsys.readouterr()
    assert captured.err == "epoch 1/1: loss 0.1\n" and captured.out == ""


def test_disabled_is_silent(capsys):
    progress = Progress(range(3), "loop", enabled=False)
    assert list(progress) == [0, 1, 2]
    progress.write("epoch 1/1")
    assert capsys.readouterr() == ("", "")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_bar_counts_the_steps(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(description="train", total=4)
    assert progress.bar is not None
    for _ in range(4):
        progress.update()
    assert progress.bar.n == 4
    progress.write("epoch 1/1")
    progress.close()
    assert "epoch 1/1" in terminal.getvalue() and "train" in terminal.getvalue()
