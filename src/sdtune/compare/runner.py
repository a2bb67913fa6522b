"""`sdtune compare`: every row on every seed, each run in a process of its own, then one judge and one report.

OUTPUT/ gets subject/ (the builtin subject's images), class_images/ (prior preservation's, generated once),
runs/ROW/seed-S/ (each run: its artifact and evaluation images, written atomically; a finished run whose
job is unchanged is reused unless --fresh), logs/, and finally results.json, report.md and report.html.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SdtuneError
from .progress import Board, job_work
from .recipes import DEFAULT_ROWS
from .recipes import Plan, load_plan, profile_for, without_token
from .worker import EVENT


@dataclass
class CompareOptions:
    """What `sdtune compare` was asked for (see the CLI's help for each)."""

    output: str
    model: str = "builtin"
    model_config: str | None = None
    images: str = ""
    token: str = ""
    class_word: str = ""
    methods: str = DEFAULT_ROWS
    seeds: int = 1
    config: str | None = None
    clip_model: str | None = None
    dino_model: str | None = None
    fresh: bool = False
    progress: bool = True


def run_compare(opts: CompareOptions) -> Path:
    """Train, evaluate and report; returns the path of report.html."""
    from .report import write_report
    from .results import assemble

    if opts.seeds < 1:
        raise SdtuneError(f"--seeds is {opts.seeds}; give at least 1.")
    started = time.time()
    out = Path(opts.output).resolve()
    profile = profile_for(opts.model, opts.images)
    token, class_word, prompts = _subject_words(opts, profile)
    plan = load_plan(profile, token, class_word, opts.methods, opts.config, prompts)
    subject = _subject_images(opts, profile, out)
    jobs = make_jobs(plan, opts, subject, out)
    board = Board([job_work(job) for job in jobs], opts.progress)
    runs: dict[tuple[str, int], dict] = {}
    try:
        for job in jobs:
            runs[(job["row"], job["seed"])] = run_job(job, out / "logs", board, opts.fresh)
    finally:
        board.close()
    judge = make_judge(plan, opts, subject)
    results = assemble(plan, asdict(opts), runs, judge, out, time.time() - started)
    return write_report(out, results)


def _subject_words(opts: CompareOptions, profile: str) -> tuple[str, str, tuple | None]:
    """(token, class word, default prompt templates): the builtin subject's, or what the user gave."""
    if profile == "builtin":
        from ..toyworld import subject

        templates = tuple(p.replace(f" {subject.TOKEN} ", " {token} ") for p in subject.EVAL_PROMPTS)
        return opts.token or subject.TOKEN, subject.CLASS_WORD, (templates, tuple(subject.CLASS_EVAL_PROMPTS))
    if not opts.images or not opts.class_word:
        raise SdtuneError("Comparing on your own subject needs both --images DIR and --class-word WORD "
                          "(e.g. --class-word dog).")
    return opts.token or "sks", opts.class_word, None


def _subject_images(opts: CompareOptions, profile: str, out: Path) -> Path:
    """The subject's image folder, checked; the builtin subject's captioned images are written to
    OUTPUT/subject."""
    from ..artifacts import atomic_output_dir
    from ..data import load_image_folder

    if profile != "builtin":
        load_image_folder(opts.images)  # refuses a missing folder or unreadable images by name
        return Path(opts.images).resolve()
    from ..toyworld.captions import caption
    from ..toyworld.subject import CLASS_WORD, instance_scenes, write_instance_images

    folder = out / "subject"
    if not folder.is_dir():
        with atomic_output_dir(folder) as tmp:
            # Captions name each picture's background and position, with {token} where the identifier goes,
            # so a row's own token (Textual Inversion's new word) takes its place.
            for path, scene in zip(write_instance_images(tmp), instance_scenes()):
                text = caption(CLASS_WORD, position=scene.position, background=scene.background, identifier="{token}")
                path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return folder


def eval_steps(steps: int, points: int) -> list[int]:
    """Evaluation steps spread evenly over a run, ending at its last step ([0] for the base model)."""
    if steps <= 0:
        return [0]
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


def make_jobs(plan: Plan, opts: CompareOptions, subject: Path, out: Path) -> list[dict]:
    """Worker jobs: class images once (when a row uses prior preservation), then every row on every seed."""
    common = {"output": str(out), "model": opts.model, "model_config": opts.model_config, "images": str(subject),
              "class_word": plan.class_word, "eval": json.loads(json.dumps(asdict(plan.evaluation)))}
    class_folder = str(out / "class_images")
    # Rows naming their own class images keep them; the others share one generated set.
    prior = [row for row in plan.rows if row.train.get("prior_preservation") and not row.data.get("class_images")]
    jobs = []
    if prior:
        jobs.append({**common, "kind": "class-images", "row": "class-images", "seed": 0, "token": plan.token,
                     "data": {**prior[0].data, "class_images": class_folder}, "out": str(out / "runs" / "class-images")})
    for seed in range(opts.seeds):
        for row in plan.rows:
            data = {**row.data, "class_images": class_folder} if row in prior else row.data
            jobs.append({**common, "kind": "row", "row": row.name, "method": row.method, "seed": seed,
                         "token": row.token, "data": data, "train": row.train, "method_cfg": row.method_cfg,
                         "eval_steps": eval_steps(row.steps, plan.evaluation.curve_points),
                         "out": str(out / "runs" / row.name / f"seed-{seed}")})
    return jobs


def run_job(job: dict, logs: Path, board: Board, fresh: bool = False) -> dict:
    """Run one worker job in a subprocess (or reuse its finished folder); returns its result or {"error"}.
    A reused result says so ("reused": true), so the report does not pass this invocation's time off as
    the comparison's."""
    folder = Path(job["out"])
    board.start(job_work(job))
    if not fresh and _finished(folder, job):
        board.finish("reused")
        return {**json.loads((folder / "result.json").read_text()), "reused": True}
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{job['row']}-seed-{job['seed']}.log"
    error = ""
    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning threads made
    # torch 10-100x slower here (FINDINGS); on a quiet CPU it costs nothing measurable.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "DIFFUSERS_VERBOSITY": "error",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "sdtune.compare.worker"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            process.stdin.write(json.dumps(job))
            process.stdin.close()
            for line in process.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    error = event.get("message", error) if event.get("event") == "error" else error
                    board.event(event)
                else:
                    log.write(line)
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
    if code == 0 and (folder / "result.json").is_file():
        board.finish()
        return json.loads((folder / "result.json").read_text())
    board.finish("failed")
    return {"error": error or f"{_last_line(log_path)} (exit status {code}; log: {log_path})"}


# Where a job names a path: those inside the comparison folder are compared relative to it.
PATH_FIELDS = (("out",), ("images",), ("data", "class_images"))


def _finished(folder: Path, job: dict) -> bool:
    """A run folder holding a result for exactly this job (also after the comparison folder was moved)."""
    try:
        done = json.loads((folder / "job.json").read_text())
        return _portable(done) == _portable(job) and (folder / "result.json").is_file()
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _portable(job: dict) -> dict:
    """The job with paths inside its comparison folder ("output") made relative to it."""
    root = Path(job["output"])
    out = json.loads(json.dumps(job))
    del out["output"]
    for fields in PATH_FIELDS:
        holder = out
        for key in fields[:-1]:
            holder = holder.get(key) or {}
        value = holder.get(fields[-1])
        if isinstance(value, str) and Path(value).is_relative_to(root):
            holder[fields[-1]] = Path(value).relative_to(root).as_posix()
    return out


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "the run stopped without a message"


def make_judge(plan: Plan, opts: CompareOptions, subject: Path):
    """The toy-world judge for the builtin subject; DINO/CLIP against the subject's images otherwise."""
    from .judge import RealJudge, ToyJudge
    from .sampling import fill

    if plan.profile == "builtin":
        from ..toyworld.subject import TOKEN

        return ToyJudge(fill(plan.evaluation.prompts, TOKEN, plan.class_word), list(plan.evaluation.class_prompts))
    from ..data import load_image_folder

    references = [record.load() for record in load_image_folder(subject)]
    texts = fill([without_token(t) for t in plan.evaluation.prompts], "", plan.class_word)
    return RealJudge(references, texts, opts.clip_model, opts.dino_model)
