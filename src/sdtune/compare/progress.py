"""One progress display for a whole comparison: stage, row, seed, step and an ETA over every job.

Work is counted in "sample passes" (one UNet pass over one latent), so a training step, an evaluation
image and a class image weigh roughly what they cost and the ETA holds across stages.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_PASSES = 3  # forward + backward of one training sample
CFG_PASSES = 2  # classifier-free guidance: conditional + unconditional


@dataclass
class JobWork:
    """A job's expected work: training steps and images to generate, each with its weight in passes."""

    label: str
    steps: int = 0
    step_passes: float = 0.0
    images: int = 0
    image_passes: float = 0.0

    @property
    def total(self) -> float:
        return self.steps * self.step_passes + self.images * self.image_passes


def job_work(job: dict) -> JobWork:
    """The expected work of a worker job (see worker.py for the job's fields)."""
    label = f"{job['row']} seed {job['seed']}" if job["kind"] == "row" else "class images"
    if job["kind"] == "class-images":
        return JobWork(label, images=job["data"]["num_class_images"],
                       image_passes=CFG_PASSES * job["data"].get("class_image_steps", 50))
    ev = job["eval"]
    final = max(job["eval_steps"])
    per_point = len(ev["prompts"]) + len(ev["class_prompts"])
    images = sum(per_point * ev["images_per_prompt" if s == final else "curve_images_per_prompt"]
                 for s in job["eval_steps"])
    steps = final if job["method"] else 0
    return JobWork(label, steps, TRAIN_PASSES * job["train"].get("batch_size", 1), images,
                   CFG_PASSES * ev["sample_steps"])


class Board:
    """A single tqdm bar over all jobs; `start` a job, feed it the worker's events, then `finish` it."""

    def __init__(self, works: list[JobWork], enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=round(sum(w.total for w in works)), disable=not enabled, unit="pass",
                         unit_scale=True, dynamic_ncols=True,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        self._count, self._index = len(works), 0
        self._work: JobWork | None = None
        self._done = 0.0  # passes credited to the current job
        self._trained = 0.0  # passes of the current job's training (its images come after)

    def start(self, work: JobWork, note: str = "") -> None:
        self._index += 1
        self._work, self._done, self._trained = work, 0.0, 0.0
        self._describe(note or "starting")

    def event(self, event: dict) -> None:
        """Advance by a worker event: {"event": "step", step, steps} or {"event": "images", done}."""
        work = self._work
        if work is None:
            return
        if event.get("event") == "step":
            self._trained = min(event["step"], work.steps) * work.step_passes
            self._advance(self._trained)
            self._describe(f"train step {event['step']}/{event['steps']}")
        elif event.get("event") == "images":  # `done`: images generated so far in this job
            self._advance(self._trained + min(event["done"], work.images) * work.image_passes)
            self._describe(f"evaluate, {event['done']} images")

    def finish(self, status: str = "done") -> None:
        if self._work is not None:
            self._advance(self._work.total)
            self._describe(status)
        self._work = None

    def close(self) -> None:
        self._bar.close()

    def _advance(self, done: float) -> None:
        step = round(done) - round(self._done)
        if step > 0:
            self._bar.update(step)
            self._done = done

    def _describe(self, what: str) -> None:
        label = self._work.label if self._work else ""
        self._bar.set_description_str(f"[{self._index}/{self._count}] {label}: {what}")
