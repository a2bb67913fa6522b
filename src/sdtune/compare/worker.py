"""One comparison run in a process of its own, so a run's peak memory is its own: train one row (or take
the base model as it is), then generate its evaluation images at each evaluation step.

`python -m sdtune.compare.worker` reads the job (JSON) on stdin and writes the run folder `job["out"]`
atomically: job.json, result.json, step-NNNNNN.npz per evaluation point and the trained artifact.
Progress goes to stdout as `@@sdtune {json}` lines for the parent's single progress display; stderr is the
run's log (OUTPUT/logs/ROW-seed-S.log): its losses, a line per tenth of the run or minute, without library bars.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

EVENT = "@@sdtune "


def emit(**event) -> None:
    """A progress event for the parent process."""
    print(EVENT + json.dumps(event), flush=True)


def main() -> int:
    from ..artifacts import atomic_output_dir
    from ..errors import SdtuneError
    from ..progress import quiet_libraries

    quiet_libraries()
    job = json.loads(sys.stdin.read())
    try:
        with atomic_output_dir(job["out"]) as folder:
            result = run_class_images(job) if job["kind"] == "class-images" else run_row(job, folder)
            (folder / "job.json").write_text(json.dumps(job, indent=1, sort_keys=True))
            (folder / "result.json").write_text(json.dumps(result, indent=1))
    except SdtuneError as exc:
        emit(event="error", message=str(exc))
        return 2
    return 0


def run_class_images(job: dict) -> dict:
    """Generate (or find cached) the class images prior preservation trains with, once for every run."""
    from ..class_images import prepare
    from ..model import load

    started = time.time()
    model = load(job["model"], config=job["model_config"])
    emit(event="ready")
    records = prepare(model, _data_config(job), Path(job["data"]["class_images"]), progress=False)
    return {"count": len(records), "seconds": time.time() - started}


def run_row(job: dict, folder: Path) -> dict:
    """Train the row (when it has a method), then sample its evaluation images at every evaluation step."""
    from ..model import load

    model = load(job["model"], config=job["model_config"])
    emit(event="ready")  # the start-up (process, imports, model) is timed apart from the work
    result: dict = {"row": job["row"], "method": job["method"], "seed": job["seed"], "pid": os.getpid(),
                    "evaluations": []}
    method, timeline, snapshots, counter = None, {0: 0.0}, {}, [0]
    if job["method"]:
        method, timeline, snapshots = _train(model, job, folder, result)
    for step in sorted(job["eval_steps"], reverse=True):  # the final weights first: they are in the model now
        final = step == max(job["eval_steps"])
        if not final:
            _restore(method, model, snapshots.pop(step))
        name = f"step-{step:06d}.npz"
        _evaluate(model, job, final, folder / name, counter)
        result["evaluations"].append({"step": step, "seconds": round(timeline.get(step, 0.0), 3), "file": name})
    result["evaluations"].sort(key=lambda e: e["step"])
    shutil.rmtree(folder / "snapshots", ignore_errors=True)
    return result


def _data_config(job: dict):
    from ..config import DataConfig, build

    values = {**job["data"], "images": job["images"], "token": job["token"], "class_word": job["class_word"]}
    return build(DataConfig, values, "data")


def _train(model, job: dict, folder: Path, result: dict):
    """Train with the shared loop; keep the weights of intermediate evaluation steps on disk (their writing
    time is taken out of the timings) and record when each step finished."""
    from .. import methods
    from ..artifacts import save_artifact
    from ..config import TrainConfig, build
    from ..progress import Throttle
    from ..train import train

    method_cls = methods.get(job["method"])
    method = method_cls(build(method_cls.config_class, job["method_cfg"], job["method"]))
    train_cfg = build(TrainConfig, {"log_dir": "none", **job["train"], "seed": job["seed"]}, "train")
    snapshots: dict[int, Path] = {}
    timeline: dict[int, float] = {}
    paused = [0.0]
    final, started = train_cfg.steps, time.time()
    log = Throttle(final, 0, started)

    def on_step(step: int, loss: float) -> None:
        timeline[step] = time.time() - started - paused[0]
        if step in job["eval_steps"] and step != final:
            began = time.time()
            snapshots[step] = save_artifact(folder / "snapshots" / f"step-{step:06d}.safetensors",
                                            method.state_dict(model))
            paused[0] += time.time() - began
        emit(event="step", step=step, steps=final, loss=round(loss, 5))
        if log.due(step, time.time()) or step == final:
            print(f"step {step}/{final} loss {loss:.5f}", file=sys.stderr, flush=True)

    run = train(model, method, train_cfg, _data_config(job), folder / "artifact", job["row"],
                progress=False, on_step=on_step)
    result.update(steps=final, wall_time_s=round(run.wall_time - paused[0], 3), peak_memory_bytes=run.peak_memory,
                  memory_kind="cuda_peak_allocated" if model.device.type == "cuda" else "peak_rss",
                  trainable_params=run.trainable_params, final_loss=run.losses[-1] if run.losses else None,
                  artifact_bytes=sum(p.stat().st_size for p in run.paths if p.is_file()),
                  artifacts=[str(p.relative_to(folder)) for p in run.paths])
    return method, timeline, snapshots


def _restore(method, model, path: Path) -> None:
    from ..artifacts import load_artifact

    tensors, _ = load_artifact(path)
    method.load_state_dict(model, tensors)
    path.unlink()


def _evaluate(model, job: dict, final: bool, path: Path, counter: list[int]) -> None:
    """Sample the subject prompts (with this row's token; before the final step only the curve's) and the
    class prompts; save them together. `counter` holds the images generated so far in this job (for progress
    events)."""
    from .sampling import fill, sample, save_samples

    ev = job["eval"]
    per_prompt = ev["images_per_prompt" if final else "curve_images_per_prompt"]
    only = None if final or not ev.get("curve_prompts") else ev["curve_prompts"]

    def on_batch(count: int) -> None:
        counter[0] += count
        emit(event="images", done=counter[0])

    settings = dict(seed=job["seed"], steps=ev["sample_steps"], guidance=ev["guidance"], on_batch=on_batch)
    subject = sample(model, fill(ev["prompts"], job["token"], job["class_word"]), per_prompt, only=only, **settings)
    class_ = sample(model, fill(ev["class_prompts"], job["token"], job["class_word"]), per_prompt, **settings)
    save_samples(path, subject, class_)


if __name__ == "__main__":
    sys.exit(main())
