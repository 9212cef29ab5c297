"""Progress reporting that suits where the output goes.

On a terminal, long work shows a tqdm bar. Elsewhere (a log file, CI, a batch job) a bar would
write thousands of carriage-return updates, so :func:`progress_bar` is silent there and the
callers print one line per epoch instead (:func:`epoch_line`).
"""
from __future__ import annotations

import sys
from typing import Iterable


def interactive() -> bool:
    """Whether stderr (where bars go) is a terminal."""
    return sys.stderr.isatty()


class _Silent:
    """The part of tqdm's interface the project uses, doing nothing."""

    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **kwargs):
    """A tqdm bar over ``iterable`` (or with ``total=``) when ``enabled`` and on a terminal, else a silent one."""
    if not (enabled and interactive()):
        return _Silent(iterable)
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def epoch_line(enabled: bool, text: str) -> None:
    """Prints ``text`` when progress is ``enabled`` but no bar is shown (output is not a terminal)."""
    if enabled and not interactive():
        print(text, flush=True)
