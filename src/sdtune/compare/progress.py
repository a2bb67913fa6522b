"""One progress display for a whole comparison: stage, row, seed, step and an ETA over every job.

The ETA comes from measured rates, not fixed guesses: each kind of work (a job's start-up, a training
sample of one method, a denoising step of an evaluation or class image) is timed as it is done, and the
work left is priced at its kind's rate. A kind not measured yet borrows from its family (another method's
training) or, failing that, from every measured second per "pass" (one UNet pass over one latent).
"""

from __future__ import annotations

import sys
import threading
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
    """Progress over all jobs, several of which may run at once: `start` a job (which returns its key), feed
    it the worker's events, then `finish` it. Safe to call from one thread per running job.

    On a terminal it is one redrawn bar; in a log it is a line per finished job and at most one more every
    LINE_SECONDS (sdtune.progress), so a long comparison's log stays short. Rates are measured per job, so
    with `lanes` jobs running side by side the work left takes 1/lanes of its price."""

    def __init__(self, works: list[JobWork], enabled: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, lanes: int = 1):
        self._stream, self._clock, self._enabled, self._lanes = stream or sys.stderr, clock, enabled, max(1, lanes)
        self._todo: dict[str, float] = {}
        for work in works:
            for kind, units in work.units.items():
                self._todo[kind] = self._todo.get(kind, 0.0) + units
        self._rates = Rates()
        self._count, self._index, self._started = len(works), 0, clock()
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._bar = self._terminal_bar() if enabled and is_terminal(self._stream) else None
        self._last_line = self._started

    def start(self, work: JobWork, note: str = "") -> int:
        """Begin a job (its start-up is timed until the worker's "ready" event); returns its key."""
        with self._lock:
            self._index += 1
            self._running[self._index] = _Running(work, self._clock())
            self._show(self._index, note or "starting")
            return self._index

    def event(self, key: int, event: dict) -> None:
        """Advance job `key` by a worker event: {"event": "ready"}, {"event": "step", step, steps} or
        {"event": "images", done} (images generated so far in this job)."""
        with self._lock:
            job = self._running.get(key)
            kind = event.get("event")
            if job is None:
                return
            if kind == "ready":
                self._credit(job, START, 1)
                self._show(key, "loaded")
            elif kind == "step" and job.work.train_kind:
                self._credit(job, job.work.train_kind, event["step"] * job.work.per_step)
                self._show(key, f"train step {event['step']}/{event['steps']}")
            elif kind == "images":
                self._credit(job, job.work.image_kind, event["done"] * job.work.per_image)
                self._show(key, f"evaluate, {event['done']} images")

    def finish(self, key: int, status: str = "done") -> None:
        """End job `key`: what is left of it is done (a reused or failed job is not timed)."""
        with self._lock:
            job = self._running.get(key)
            if job is None:
                return
            left = {k: u - job.done.get(k, 0.0) for k, u in job.work.units.items() if u > job.done.get(k, 0.0)}
            if status == "done" and len(left) == 1:  # work that sent no events (class images) is timed whole
                self._credit(job, next(iter(left)), float("inf"))
                left = {}
            for kind, units in left.items():  # not timed: a reused run took no time, a failed one is no guide
                self._todo[kind] -= units
            self._show(key, status, force=True)
            del self._running[key]

    def close(self) -> None:
        """Leave the terminal bar where it ended."""
        if self._bar is not None:
            self._bar.close()

    def eta(self) -> float | None:
        """Seconds left for all jobs at the measured rates (None before anything was measured)."""
        left = self._rates.remaining(self._todo)
        return None if left is None else left / self._lanes

    def _credit(self, job: _Running, kind: str, done: float) -> None:
        """`job` has done `done` units of `kind`: time since its last credit is their cost."""
        now = self._clock()
        units = min(done, job.work.units.get(kind, 0.0)) - job.done.get(kind, 0.0)
        if units <= 0:
            return
        self._rates.add(kind, units, now - job.mark)
        self._todo[kind] = self._todo.get(kind, 0.0) - units
        job.done[kind] = job.done.get(kind, 0.0) + units
        job.mark = now

    def _show(self, key: int, what: str, force: bool = False) -> None:
        if not self._enabled:
            return
        job = self._running[key]
        now = self._clock()
        elapsed, left = now - self._started, self.eta()
        others = len(self._running) - 1
        text = f"[{key}/{self._count}] {job.work.label}: {what}" + (f" (+{others} running)" if others else "")
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


@dataclass
class _Running:
    """A started job (its key is its start number): its work, units done so far and when its last progress
    was credited."""

    work: JobWork
    mark: float
    done: dict[str, float] = field(default_factory=dict)
