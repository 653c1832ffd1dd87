"""Progress on long loops: one helper for the attacker's training and every defense.

A tqdm bar only where someone watches: enabled, tqdm installed and stderr a terminal. Elsewhere (CI logs, files)
bar redraws would fill megabytes, so only the lines a loop writes with :meth:`Progress.write` are printed.
"""
from __future__ import annotations

import sys


class Progress:
    """Iterates `iterable` (or counts `total` steps through :meth:`update`), showing a bar when watched."""

    def __init__(self, iterable=None, description: str = "", enabled: bool = True, total: int | None = None):
        self.iterable, self.enabled, self.bar = iterable, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)

    def __iter__(self):
        return iter(self.bar if self.bar is not None else self.iterable)

    def update(self, steps: int = 1):
        if self.bar is not None:
            self.bar.update(steps)

    def set_postfix(self, **values):
        if self.bar is not None:
            self.bar.set_postfix(**values, refresh=False)

    def write(self, line: str):
        """A line worth keeping (an epoch's summary): above the bar, or on stderr when there is none."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def progress_bar(iterable, description: str, enabled: bool = True) -> Progress:
    return Progress(iterable, description, enabled)
