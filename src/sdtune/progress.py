"""Progress people can read: a redrawn bar on a terminal, a few plain lines in a log file, nothing when quiet.

A carriage-return bar piped to a file becomes one enormous line, so where the stream is not a terminal the
progress is written as whole lines, at most one per LINE_FRACTION of the work or LINE_SECONDS of time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

LINE_FRACTION = 0.1  # a log line each time another tenth of the work is done...
LINE_SECONDS = 60.0  # ...or a minute has passed since the last one, whichever comes first


def is_terminal(stream: TextIO | None) -> bool:
    """Whether `stream` is an interactive terminal (where a redrawn bar makes sense)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def duration(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Throttle:
    """Says when a log line is due: after LINE_FRACTION more of `total` or LINE_SECONDS, whichever first."""

    def __init__(self, total: float, start: float, now: float):
        self._step = max(total, 1) * LINE_FRACTION
        self._next, self._time = start + self._step, now

    def due(self, done: float, now: float) -> bool:
        """True (and resets) when a line should be written for `done` units at time `now`."""
        if done < self._next and now - self._time < LINE_SECONDS:
            return False
        while self._next <= done:
            self._next += self._step
        self._time = now
        return True


class Lines:
    """tqdm's update / set_postfix / close for a log file: plain lines with count, postfix, rate and ETA."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self._initial = total, initial, initial
        self._desc, self._unit, self._stream, self._clock = desc, unit, stream or sys.stderr, clock
        self._started = clock()
        self._throttle = Throttle(total, initial, self._started)
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        """Count `n` more; write a line when one is due (and at the end)."""
        self.n += n
        if self._throttle.due(self.n, self._clock()) or self.n >= self.total:
            self._write()

    def set_postfix(self, **values) -> None:
        """Values the next line shows after the count (e.g. loss)."""
        self._postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def note(self, text: str) -> None:
        """A message line of its own (e.g. a validation reading)."""
        print(text, file=self._stream, flush=True)

    def close(self) -> None:
        """Say where a run that stopped early got to."""
        if self.n < self.total:  # stopped early: say where
            self._write()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self) -> None:
        elapsed = self._clock() - self._started
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - self.n) / rate) if rate > 0 else "?"
        parts = [f"{self._desc}: {self._unit} {self.n}/{self.total}", self._postfix,
                 f"{rate:.2f} {self._unit}/s", f"elapsed {duration(elapsed)}", f"ETA {eta}"]
        print(", ".join(p for p in parts if p), file=self._stream, flush=True)


def bar(total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
        stream: TextIO | None = None):
    """A progress bar: tqdm on a terminal, `Lines` elsewhere, a silent tqdm when not `enabled`."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if enabled and not is_terminal(stream):
        return Lines(total, initial, desc, unit, stream)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True,
                file=stream)


def note(progress, text: str) -> None:
    """A message line beside a progress display (above a tqdm bar, between Lines' lines); none when silent."""
    if isinstance(progress, Lines):
        progress.note(text)
    elif not progress.disable:
        progress.write(text, file=progress.fp)


def quiet_libraries() -> None:
    """Library loading bars and warnings would bury sdtune's own messages (the CLI's and a compare worker's)."""
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
