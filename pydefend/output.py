"""Result directories written whole or not at all.

A defense's results (report, plots, repaired model) are written into a staging directory beside the final one and
moved into place when all of them are there: a run killed half way leaves the previous results, or none, never new
weights under an old description. Reusing a directory that holds results must be asked for (``overwrite``), and
then the old contents go entirely, so no plot of another run is left beside the new report.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path


class OutputError(ValueError):
    """The output directory cannot be used as asked."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ResultDirectory:
    """``with ResultDirectory(out, overwrite) as staging: ...write files into staging...``; checked and staged
    on construction, so that an unusable ``out`` fails before any work is done."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} is a file, not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
            raise OutputError(f"--out {self.out} already holds results: pass --overwrite to replace them, or "
                              "another --out")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot write results to {self.out}: {exc.strerror or exc}") from None

    def __enter__(self) -> Path:
        return self.staging

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        # Swap in two renames: between them, the old results sit complete under a hidden name.
        previous = self.out.parent / f".{self.out.name}.previous-{os.getpid()}"
        if self.out.exists():
            self.out.rename(previous)
        self.staging.rename(self.out)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(previous)
        return False
