"""`sdtune compare`: every row on every seed of every subject, each run in a process of its own, then one
judge per subject and one report.

For each builtin subject OUTPUT/subjects/NAME/ gets subject/ (its captioned images), class_images/ (prior
preservation's, generated once) and runs/ROW/seed-S/ (each run: its artifact and evaluation images, written
atomically; a finished run whose job is unchanged is reused unless --fresh); a subject of one's own has
class_images/ and runs/ at the top of OUTPUT. Then logs/, results.json, report.md and report.html.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SdtuneError
from .progress import Board, job_work
from .recipes import DEFAULT_ROWS
from .recipes import Plan, load_plan, profile_for, without_token
from .worker import EVENT

if TYPE_CHECKING:
    from ..toyworld.subjects import Subject
    from .judge import RealJudge, Samples, ToyJudge

# The builtin subjects' evaluation prompts, by type, in sampling order: two new factors first, so the prompts
# the comparison always had keep their index and with it their noise (and their numbers).
EVAL_ORDER = ("two_factors", "caption", "identifier", "one_factor", "held_out_class")
CURVE_TYPES = ("two_factors", "one_factor")  # also sampled along the run (the headline and the hard column)


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
    subjects: str = ""
    jobs: int = 0  # runs at a time (0: as many as suit this machine, see default_lanes)


@dataclass
class Part:
    """One subject of a comparison: its builtin entry (None for one's own images), plan, image folder, where
    its runs go (relative to OUTPUT) and, once the runs are done, its judge and ceiling images."""

    subject: Subject | None
    plan: Plan
    images: Path
    root: str
    judge: ToyJudge | RealJudge | None = None
    ceiling: list[Samples] | None = None

    @property
    def name(self) -> str:
        return self.subject.name if self.subject else ""


def run_compare(opts: CompareOptions) -> Path:
    """Train, evaluate and report; returns the path of report.html."""
    from .report import write_report
    from .results import assemble

    if opts.seeds < 1:
        raise SdtuneError(f"--seeds is {opts.seeds}; give at least 1.")
    started = time.time()
    out = Path(opts.output).resolve()
    profile = profile_for(opts.model)
    parts = [_part(opts, profile, subject, out) for subject in _subjects(opts, profile)]
    jobs = [job for part in parts for job in make_jobs(part.plan, opts, part.images, out, part.name)]
    lanes = Lanes.for_machine(opts.jobs, opts.model)
    board = Board([job_work(job) for job in jobs], opts.progress, lanes=lanes.count)
    restore = stop_on_sigterm()
    try:
        runs = run_jobs(jobs, out / "logs", board, lanes, opts.fresh)
    finally:
        board.close()
        restore()
    vae = _ceiling_vae(opts, profile)
    for part in parts:
        part.judge = make_judge(part.plan, opts, part.images, part.subject)
        part.ceiling = part.judge.ceiling(vae, part.plan.evaluation.images_per_prompt) if vae else None
    results = assemble(parts, asdict(opts), runs, out, time.time() - started, lanes)
    return write_report(out, results)


def stop_on_sigterm():
    """Make SIGTERM stop the comparison as Ctrl-C does (its runs' processes stopped with it, not left running);
    returns what puts the previous handler back (nothing to do where signals cannot be set: not the main
    thread, e.g. the UI)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _subjects(opts: CompareOptions, profile: str) -> list[Subject | None]:
    """The builtin subjects --subjects names (default: the first), or [None] for one's own images."""
    from ..toyworld.catalogue import DEFAULT_SUBJECT, select_subjects

    if profile == "builtin" and not opts.images:
        return select_subjects(opts.subjects or DEFAULT_SUBJECT)
    if opts.subjects:
        raise SdtuneError("--subjects picks builtin subjects; leave it out when comparing on --images.")
    return [None]


def _part(opts: CompareOptions, profile: str, subject: Subject | None, out: Path) -> Part:
    """A subject's validated plan and image folder (a builtin subject's captioned images are written to
    OUTPUT/subjects/NAME/subject)."""
    token, class_word, prompts = _subject_words(opts, profile, subject)
    plan = load_plan(profile, token, class_word, opts.methods, opts.config, prompts)
    if subject is None:
        return Part(None, plan, _subject_images(opts, profile, out), "")
    if plan.evaluation.prompts == prompts[0]:  # the subject's own prompts, not a --config's
        kinds = [kind for kind in EVAL_ORDER for _ in subject.prompts.get(kind, ())]
        plan.evaluation = replace(plan.evaluation, curve_prompts=tuple(
            j for j, kind in enumerate(kinds) if kind in CURVE_TYPES))
    root = f"subjects/{subject.name}"
    return Part(subject, plan, _subject_images(opts, profile, out / root, subject), root)


def _subject_words(opts: CompareOptions, profile: str, subject=None) -> tuple[str, str, tuple | None]:
    """(token, class word, default prompt templates): a builtin subject's (default: the first), or what the
    user gave; on the builtin model, one's own subject gets toy-world prompts from its images and class word."""
    if profile == "builtin" and not opts.images:
        from ..toyworld.catalogue import QUARTERED_CIRCLE

        subject = subject or QUARTERED_CIRCLE
    elif not opts.images or not opts.class_word:
        raise SdtuneError("Comparing on your own subject needs both --images DIR and --class-word WORD "
                          "(e.g. --class-word dog).")
    elif profile == "builtin":
        subject = own_subject(opts.images, opts.class_word, opts.token).contexts
    else:
        return opts.token or "sks", opts.class_word, None
    ordered = [p for kind in EVAL_ORDER for p in subject.prompts.get(kind, ())]
    templates = tuple(p.replace(f" {subject.token} ", " {token} ") for p in ordered)
    return opts.token or subject.token, subject.class_word, (templates, tuple(subject.prompts["class"]))


def own_subject(images: str | Path, class_word: str, token: str = ""):
    """One's own subject on the builtin model, from the images in a folder (see toyworld/own_subject.py)."""
    from ..data import load_image_folder
    from ..toyworld.own_subject import check_class_word, own_subject as from_images

    check_class_word(class_word)  # before reading any image: the word alone decides
    return from_images([record.load() for record in load_image_folder(images)], class_word, token or "sks")


def _subject_images(opts: CompareOptions, profile: str, out: Path, subject=None) -> Path:
    """The subject's image folder, checked; a builtin subject's captioned images are written to
    OUT/subject."""
    from ..artifacts import atomic_output_dir
    from ..data import load_image_folder

    if opts.images:
        load_image_folder(opts.images)  # refuses a missing folder or unreadable images by name
        return Path(opts.images).resolve()
    folder = out / "subject"
    if not folder.is_dir():
        with atomic_output_dir(folder) as tmp:
            # Captions name each picture's background and position, with {token} where the identifier goes,
            # so a row's own token (Textual Inversion's new word) takes its place.
            subject.write_instance_images(tmp, captions=True, token="{token}")
    return folder


def _ceiling_vae(opts: CompareOptions, profile: str):
    """The base model's VAE, which the builtin subjects' ceiling images go through (None for one's own)."""
    if profile != "builtin" or opts.images:
        return None
    from ..model import load

    return load(opts.model, config=opts.model_config).vae


def eval_steps(steps: int, points: int) -> list[int]:
    """Evaluation steps spread evenly over a run, ending at its last step ([0] for the base model)."""
    if steps <= 0:
        return [0]
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


def make_jobs(plan: Plan, opts: CompareOptions, subject: Path, out: Path, name: str = "") -> list[dict]:
    """Worker jobs of one subject (`name`: a builtin one's, its files under OUTPUT/subjects/NAME): class images
    once (when a row uses prior preservation), then every row on every seed."""
    common = {"output": str(out), "subject": name, "model": opts.model, "model_config": opts.model_config,
              "images": str(subject), "class_word": plan.class_word,
              "eval": json.loads(json.dumps(asdict(plan.evaluation)))}
    base = out / "subjects" / name if name else out
    class_folder = str(base / "class_images")
    # Rows naming their own class images keep them; the others share one generated set.
    prior = [row for row in plan.rows if row.train.get("prior_preservation") and not row.data.get("class_images")]
    jobs = []
    if prior:
        jobs.append({**common, "kind": "class-images", "row": "class-images", "seed": 0, "token": plan.token,
                     "data": {**prior[0].data, "class_images": class_folder},
                     "out": str(base / "runs" / "class-images")})
    for seed in range(opts.seeds):
        for row in plan.rows:
            data = {**row.data, "class_images": class_folder} if row in prior else row.data
            jobs.append({**common, "kind": "row", "row": row.name, "method": row.method, "seed": seed,
                         "token": row.token, "data": data, "train": row.train, "method_cfg": row.method_cfg,
                         "eval_steps": eval_steps(row.steps, plan.evaluation.curve_points),
                         "out": str(base / "runs" / row.name / f"seed-{seed}")})
    return jobs


@dataclass(frozen=True)
class Lanes:
    """How many runs go at once and how many CPU threads each gets.

    On a CPU, runs side by side on a thread each beat one run on every thread: on the 2-core development
    machine a LoRA step took the same time on one thread as on two, and two single-thread runs at once did
    twice the work (BENCHMARKS.md). On a GPU runs go one at a time, so each has the card to itself and its
    time and memory are its own."""

    count: int
    threads: int

    @classmethod
    def for_machine(cls, asked: int, model: str) -> Lanes:
        import torch

        if asked < 0:
            raise SdtuneError(f"--jobs is {asked}; give 1 or more (or 0 for as many as suit this machine).")
        cores = os.cpu_count() or 1
        if torch.cuda.is_available():
            count = asked or 1
        else:
            # Each run holds its own copy of the model: a big one on a CPU goes alone unless asked otherwise.
            count = asked or (min(cores, MAX_CPU_LANES) if model.startswith(SMALL_MODELS) else 1)
        return cls(count, max(1, cores // count))


MAX_CPU_LANES = 4  # beyond this, one run's threads are worth more than another run (and memory adds up)
SMALL_MODELS = ("builtin", "tiny:")  # models of a few million parameters (< 1 GB per run)


def run_jobs(jobs: list[dict], logs: Path, board: Board, lanes: Lanes, fresh: bool = False
             ) -> dict[tuple[str, str, int], dict]:
    """Run every job, `lanes.count` at a time, in the given order except that a row waits for the class
    images it trains with; returns each job's result by (subject, row, seed)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    needs = {id(job): _class_folder(job) for job in jobs}
    makes = {_class_folder(job): id(job) for job in jobs if job["kind"] == "class-images"}
    finished: set[int] = set()
    pending, running, runs = list(jobs), {}, {}
    workers: set[subprocess.Popen] = set()  # the running jobs' processes: stopped with the comparison
    with ThreadPoolExecutor(lanes.count) as pool:
        try:
            while pending or running:
                ready = [job for job in pending if job["kind"] == "class-images" or
                         makes.get(needs[id(job)], id(job)) in finished | {id(job)}]
                for job in ready[:lanes.count - len(running)]:
                    pending.remove(job)
                    running[pool.submit(run_job, job, logs, board, fresh, lanes.threads, workers)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    finished.add(id(job))
                    runs[(job["subject"], job["row"], job["seed"])] = future.result()
        except BaseException:  # Ctrl-C, SIGTERM (see stop_on_sigterm): start nothing new, stop what runs
            pending.clear()
            for process in list(workers):
                process.kill()
            raise
    return {(job["subject"], job["row"], job["seed"]): runs[(job["subject"], job["row"], job["seed"])]
            for job in jobs}


def _class_folder(job: dict) -> str:
    """The class-image folder a job makes or trains with ("" for none)."""
    return str((job.get("data") or {}).get("class_images") or "")


def run_job(job: dict, logs: Path, board: Board, fresh: bool = False, threads: int = 0,
            workers: set | None = None) -> dict:
    """Run one worker job in a subprocess (or reuse its finished folder); returns its result or {"error"}.
    A reused result says so ("reused": true), so the report does not pass this invocation's time off as
    the comparison's. `threads`: the CPU threads the run may use (0: torch's default); `workers`: the set
    its process is in while it runs."""
    workers = set() if workers is None else workers
    folder = Path(job["out"])
    key = board.start(job_work(job))
    if not fresh and _finished(folder, job):
        board.finish(key, "reused")
        return {**json.loads((folder / "result.json").read_text()), "reused": True}
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{job['subject'] + '-' if job.get('subject') else ''}{job['row']}-seed-{job['seed']}.log"
    error = ""
    env = {**os.environ, "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "sdtune.compare.worker"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        workers.add(process)
        try:
            process.stdin.write(json.dumps(job))
            process.stdin.close()
            for line in process.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    error = event.get("message", error) if event.get("event") == "error" else error
                    board.event(key, event)
                else:
                    log.write(line)
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            workers.discard(process)
    if code == 0 and (folder / "result.json").is_file():
        board.finish(key)
        return json.loads((folder / "result.json").read_text())
    board.finish(key, "failed")
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


def make_judge(plan: Plan, opts: CompareOptions, subject: Path, builtin=None):
    """The toy-world judge for a builtin subject (`builtin`, default the first) or, on the builtin model, for
    one's own (subject fidelity by similarity to its images); DINO/CLIP against the subject's images otherwise."""
    from .judge import OWN_METRICS, RealJudge, ToyJudge
    from .sampling import fill

    if plan.profile == "builtin" and opts.images:
        own = own_subject(subject, plan.class_word, plan.token)
        return ToyJudge(own, fill(plan.evaluation.prompts, own.token, plan.class_word),
                        list(plan.evaluation.class_prompts), OWN_METRICS)
    if plan.profile == "builtin":
        from ..toyworld.catalogue import QUARTERED_CIRCLE

        builtin = builtin or QUARTERED_CIRCLE
        return ToyJudge(builtin, fill(plan.evaluation.prompts, builtin.token, plan.class_word),
                        list(plan.evaluation.class_prompts))
    from ..data import load_image_folder

    references = [record.load() for record in load_image_folder(subject)]
    texts = fill([without_token(t) for t in plan.evaluation.prompts], "", plan.class_word)
    return RealJudge(references, texts, opts.clip_model, opts.dino_model)
