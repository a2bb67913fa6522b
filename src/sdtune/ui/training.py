"""One training at a time, on a worker thread, observable (step, losses, validation images) and cancellable."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdtuneError
from .state import ModelSource, unexpected


@dataclass
class TrainRequest:
    """What the Train tab asks for; settings left out keep the library's defaults."""

    method: str
    images: str
    token: str = "sks"
    class_word: str = ""
    name: str = ""
    train: dict = field(default_factory=dict)  # TrainConfig fields
    method_settings: dict = field(default_factory=dict)  # the method's config fields


@dataclass
class TrainStatus:
    """A consistent copy of a job's progress for the page to show."""

    state: str  # idle | preparing | training | done | cancelled | failed
    name: str = ""
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as the loop reported them
    message: str = ""
    validation: list[Path] = field(default_factory=list)
    version: int = 0

    @property
    def percent(self) -> int:
        return int(100 * self.step / self.total) if self.total else 0


class TrainJob:
    """A training run on its own thread; `on_step` records progress and answers cancellation."""

    def __init__(self, name: str, out_dir: Path, total: int):
        self.name, self.out_dir, self.total = name, out_dir, total
        self.state, self.step, self.message = "preparing", 0, ""
        self.losses: list[tuple[int, float]] = []
        self.started = time.time()
        self.version = 0
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.state in ("preparing", "training")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def on_step(self, step: int, loss: float | None) -> bool:
        """The loop's per-step call: record progress; True asks it to stop (keeping a checkpoint)."""
        with self._lock:
            self.state, self.step = "training", step
            if loss is not None:  # the loop may read losses on the host only every few steps
                self.losses.append((step, float(loss)))
            self.version += 1
        return self._cancel.is_set()

    def finish(self, state: str, message: str) -> None:
        with self._lock:
            self.state, self.message = state, message
            self.version += 1

    def status(self) -> TrainStatus:
        with self._lock:
            return TrainStatus(self.state, self.name, self.step, self.total, list(self.losses), self.message,
                               self._validation_images(), self.version)

    def _validation_images(self) -> list[Path]:
        folder = self.out_dir / "validation"
        if not folder.is_dir():
            return []
        fresh = [p for p in folder.glob("step-*.png") if p.stat().st_mtime >= self.started - 1]
        return sorted(fresh)


class TrainingRunner:
    """Starts training jobs one at a time; a second request while one runs is refused with a clear message."""

    def __init__(self, models: ModelSource, runs_dir: Path):
        self.models, self.runs_dir = models, Path(runs_dir)
        self._job: TrainJob | None = None
        self._lock = threading.Lock()

    def start(self, request: TrainRequest) -> TrainJob:
        """Check the settings, then train on a worker thread; raises SdtuneError when they are wrong."""
        from .. import outputs
        from ..cli import default_name

        with self._lock:
            if self._job is not None and self._job.running:
                raise SdtuneError(f"A training ({self._job.name}) is already running; wait for it to finish "
                                  "or cancel it before starting another.")
            configs = build_configs(request, self.models.spec)
            request.name = outputs.check_name(request.name.strip() or default_name(configs[2].token), "Name")
            out_dir = self.runs_dir / request.name
            method_cls, method_cfg, _, train_cfg = configs
            outputs.plan(out_dir, request.name, method_cls(method_cfg).output_files(request.name, None),
                         train_cfg.log_dir)  # refused on the page, before the worker starts
            job = TrainJob(request.name, out_dir, configs[3].steps)
            job.thread = threading.Thread(target=self._run, args=(job, configs), name="sdtune-train", daemon=True)
            self._job = job
            job.thread.start()
            return job

    def cancel(self) -> str:
        """Ask the running job to stop after its current step (it keeps a checkpoint of that step)."""
        job = self._job
        if job is None or not job.running:
            return "No training is running."
        job.cancel()
        return f"Stopping {job.name} after the current step; its checkpoint will be kept."

    def status(self) -> TrainStatus:
        job = self._job
        return job.status() if job is not None else TrainStatus("idle")

    def wait(self, timeout: float | None = None) -> TrainStatus:
        """Block until the current job ends (for scripts and tests)."""
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.status()

    def _run(self, job: TrainJob, configs: tuple) -> None:
        from ..train import train

        method_cls, method_cfg, data_cfg, train_cfg = configs
        try:
            model = self.models.fresh()
            result = train(model, method_cls(method_cfg), train_cfg, data_cfg, job.out_dir, job.name,
                           progress=False, on_step=job.on_step)
            written = ", ".join(p.name for p in result.paths)
            job.finish("done", f"Trained {job.name} in {result.wall_time:.1f} s; wrote {written}.")
        except SdtuneError as exc:
            job.finish("cancelled" if job.cancel_requested else "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a worker thread must report, not die silently
            job.finish("failed", unexpected("Training", exc))


def build_configs(request: TrainRequest, model: str = "") -> tuple:
    """(method class, method config, DataConfig, TrainConfig) validated exactly as the CLI validates flags, over
    the defaults `sdtune train` has on `model` (the builtin recipe on the builtin model)."""
    from .. import methods
    from ..compare.recipes import merge, training_defaults
    from ..config import DataConfig, TrainConfig, build
    from ..data import load_image_folder

    method_cls = methods.get(request.method)
    images = request.images.strip()
    if not images:
        raise SdtuneError("Choose an image folder or upload images before starting a training.")
    defaults = training_defaults(model, request.method, dict(request.method_settings))
    data_values = {"images": images, "token": request.token.strip(), "class_word": request.class_word.strip()}
    data_cfg = build(DataConfig, merge(defaults.get("data", {}), data_values), "data")
    train_cfg = build(TrainConfig, merge(defaults.get("train", {}), dict(request.train)), "train")
    method_cfg = build(method_cls.config_class, merge(defaults.get(request.method, {}), dict(request.method_settings)),
                       request.method)
    load_image_folder(data_cfg.images)  # bad images fail now, before a model is loaded
    return method_cls, method_cfg, data_cfg, train_cfg
