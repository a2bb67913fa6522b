"""`sdtune compare`: every row on every seed of every subject, each run in a process of its own, then one
judge per subject and one report.

For each builtin subject OUTPUT/subjects/NAME/ gets subject/ (its captioned images), class_images/ (prior
preservation's, generated once) and runs/ROW/seed-S/ (each run: its artifact and evaluation images, written
atomically; a finished run whose job is unchanged is reused unless --fresh); a subject of one's own has
class_images/ and runs/ at the top of OUTPUT. Then logs/, results.json, report.md and report.html.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SdtuneError
from .progress import Board, job_work
from .recipes import DEFAULT_ROWS, Plan, load_plan, profile_for, without_token
from .scheduling import Lanes, run_jobs, stop_on_sigterm

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
    jobs: int = 0  # runs at a time (0: as many as suit this machine, see Lanes.for_machine)


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
