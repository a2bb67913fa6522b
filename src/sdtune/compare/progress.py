"""One progress display for a whole comparison: stage, row, seed, step and an ETA over every job.

The ETA comes from measured rates, not fixed guesses: each kind of work (a job's start-up, a training
sample of one method, a denoising step of an evaluation or class image) is timed as it is done, and the
work left is priced at its kind's rate. A kind not measured yet borrows from its family (another method's
training) or, failing that, from every measured second per "pass" (one UNet pass over one latent).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ..progress import LINE_SECONDS, duration, is_terminal

TRAIN_PASSES = 3  # forward + backward of one training sample
CFG_PASSES = 2  # classifier-free guidance: conditional + unconditional
START, SAMPLE, CLASS = "start", "sample", "class images"  # kinds of work besides "train:METHOD"
PASSES = {START: 0.0, SAMPLE: CFG_PASSES, CLASS: CFG_PASSES, "train": TRAIN_PASSES}  # prior cost per unit


def family(kind: str) -> str:
    """"train" for "train:lora", else the kind itself."""
    return kind.split(":")[0]


@dataclass
class JobWork:
    """A job's expected work in units of each kind, and how progress events map to those units."""

    label: str
    units: dict[str, float] = field(default_factory=dict)
    train_kind: str = ""
    per_step: float = 0.0  # training units per step (the batch size)
    per_image: float = 0.0  # sampling units per image (its denoising steps)
    image_kind: str = SAMPLE


def job_work(job: dict) -> JobWork:
    """The expected work of a worker job (see worker.py for the job's fields)."""
    if job["kind"] == "class-images":
        steps = job["data"].get("class_image_steps", 50)
        return JobWork("class images", {START: 1, CLASS: job["data"]["num_class_images"] * steps},
                       per_image=steps, image_kind=CLASS)
    ev = job["eval"]
    final = max(job["eval_steps"])
    curve = len(ev.get("curve_prompts") or ev["prompts"])
    images = sum((len(ev["prompts"]) + len(ev["class_prompts"])) * ev["images_per_prompt"] if s == final
                 else (curve + len(ev["class_prompts"])) * ev["curve_images_per_prompt"] for s in job["eval_steps"])
    label = f"{job['subject'] + ': ' if job.get('subject') else ''}{job['row']} seed {job['seed']}"
    work = JobWork(label, {START: 1, SAMPLE: images * ev["sample_steps"]}, per_image=ev["sample_steps"])
    if job["method"]:
        work.train_kind, work.per_step = f"train:{job['method']}", job["train"].get("batch_size", 1)
        work.units[work.train_kind] = final * work.per_step
    return work


class Rates:
    """Measured seconds per unit of each kind of work."""

    def __init__(self):
        self._seconds: dict[str, float] = {}
        self._units: dict[str, float] = {}

    def add(self, kind: str, units: float, seconds: float) -> None:
        """Record that `units` of `kind` took `seconds`."""
        if units > 0:
            self._seconds[kind] = self._seconds.get(kind, 0.0) + seconds
            self._units[kind] = self._units.get(kind, 0.0) + units

    def rate(self, kind: str) -> float | None:
        """Seconds per unit: measured, else the family's measured mean, else priced in passes; None when
        nothing priced in passes was measured yet."""
        if kind in self._units:
            return self._seconds[kind] / self._units[kind]
        kin = [k for k in self._units if family(k) == family(kind)]
        if kin:
            return sum(self._seconds[k] for k in kin) / sum(self._units[k] for k in kin)
        if PASSES[family(kind)] == 0:
            return 0.0
        passes = sum(self._units[k] * PASSES[family(k)] for k in self._units)
        if passes == 0:
            return None
        return sum(self._seconds[k] for k in self._units if PASSES[family(k)]) / passes * PASSES[family(kind)]

    def remaining(self, todo: dict[str, float]) -> float | None:
        """Seconds for the work in `todo` (units per kind); None while some of it has no price yet."""
        total = 0.0
        for kind, units in todo.items():
            if units > 0:
                rate = self.rate(kind)
                if rate is None:
                    return None
                total += units * rate
        return total


class Board:
    """Progress over all jobs; `start` a job, feed it the worker's events, then `finish` it.

    On a terminal it is one redrawn bar; in a log it is a line per finished job and at most one more every
    LINE_SECONDS (sdtune.progress), so a long comparison's log stays short."""

    def __init__(self, works: list[JobWork], enabled: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._stream, self._clock, self._enabled = stream or sys.stderr, clock, enabled
        self._todo: dict[str, float] = {}
        for work in works:
            for kind, units in work.units.items():
                self._todo[kind] = self._todo.get(kind, 0.0) + units
        self._rates = Rates()
        self._count, self._index, self._started = len(works), 0, clock()
        self._work: JobWork | None = None
        self._done: dict[str, float] = {}  # units of the current job done so far
        self._mark = self._started  # when the current job's last progress was credited
        self._bar = self._terminal_bar() if enabled and is_terminal(self._stream) else None
        self._last_line = self._started

    def start(self, work: JobWork, note: str = "") -> None:
        """Begin a job (its start-up is timed until the worker's "ready" event)."""
        self._index += 1
        self._work, self._done, self._mark = work, {}, self._clock()
        self._show(note or "starting")

    def event(self, event: dict) -> None:
        """Advance by a worker event: {"event": "ready"}, {"event": "step", step, steps} or
        {"event": "images", done} (images generated so far in this job)."""
        work, kind = self._work, event.get("event")
        if work is None:
            return
        if kind == "ready":
            self._credit(START, 1)
            self._show("loaded")
        elif kind == "step" and work.train_kind:
            self._credit(work.train_kind, event["step"] * work.per_step)
            self._show(f"train step {event['step']}/{event['steps']}")
        elif kind == "images":
            self._credit(work.image_kind, event["done"] * work.per_image)
            self._show(f"evaluate, {event['done']} images")

    def finish(self, status: str = "done") -> None:
        """End the current job: what is left of it is done (a reused or failed job is not timed)."""
        work = self._work
        if work is not None:
            left = {k: u - self._done.get(k, 0.0) for k, u in work.units.items() if u > self._done.get(k, 0.0)}
            if status == "done" and len(left) == 1:  # work that sent no events (class images) is timed whole
                self._credit(next(iter(left)), float("inf"))
                left = {}
            for kind, units in left.items():  # not timed: a reused run took no time, a failed one is no guide
                self._todo[kind] -= units
            self._show(status, force=True)
        self._work = None

    def close(self) -> None:
        """Leave the terminal bar where it ended."""
        if self._bar is not None:
            self._bar.close()

    def eta(self) -> float | None:
        """Seconds left for all jobs at the measured rates (None before anything was measured)."""
        return self._rates.remaining(self._todo)

    def _credit(self, kind: str, done: float) -> None:
        """The current job has done `done` units of `kind`: time since the last credit is their cost."""
        now = self._clock()
        units = min(done, self._work.units.get(kind, 0.0)) - self._done.get(kind, 0.0)
        if units <= 0:
            return
        self._rates.add(kind, units, now - self._mark)
        self._todo[kind] = self._todo.get(kind, 0.0) - units
        self._done[kind] = self._done.get(kind, 0.0) + units
        self._mark = now

    def _show(self, what: str, force: bool = False) -> None:
        if not self._enabled:
            return
        label = self._work.label if self._work else ""
        now = self._clock()
        elapsed, left = now - self._started, self.eta()
        text = f"[{self._index}/{self._count}] {label}: {what}"
        timing = f"elapsed {duration(elapsed)}, ETA {duration(left) if left is not None else '?'}"
        if self._bar is not None:
            self._bar.n = round(1000 * elapsed / (elapsed + left)) if left is not None and elapsed + left else 0
            self._bar.set_description_str(text, refresh=False)
            self._bar.set_postfix_str(timing)
        elif force or now - self._last_line >= LINE_SECONDS:
            print(f"{text}, {timing}", file=self._stream, flush=True)
            self._last_line = now

    def _terminal_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=1000, file=self._stream, dynamic_ncols=True,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")
