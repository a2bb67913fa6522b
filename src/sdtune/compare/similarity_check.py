"""Does the offline similarity rank methods as the exact scorers do? From a finished (or partly finished)
builtin comparison folder: per subject and row, the one-new-factor images' mean subject fidelity by the
subject's exact scorer and by the similarity to its instance images, and the Spearman correlation over
every (subject, row) pair.

`python scripts/similarity_check.py OUTPUT` prints the table and the correlation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdtuneError
from ..toyworld.captions import parse_caption
from ..toyworld.catalogue import QUARTERED_CIRCLE, get_subject
from ..toyworld.similarity import similarity
from ..toyworld.subjects import HEADLINE_TYPE, Subject
from .sampling import fill, load_samples

SUBJECT_FOLDER, RUNS_FOLDER = "subject", "runs"


@dataclass(frozen=True)
class Pair:
    """One row of one subject: its mean exact score and mean similarity over `n` images of the prompt type."""

    subject: str
    row: str
    exact: float
    similar: float
    n: int


def subject_folders(output: Path) -> list[tuple[Subject, Path]]:
    """(subject, folder) of every builtin subject in a comparison folder; a folder from before several subjects
    (runs/ at its top) holds the first one."""
    if (output / "subjects").is_dir():
        return [(get_subject(p.name), p) for p in sorted((output / "subjects").iterdir()) if p.is_dir()]
    if (output / RUNS_FOLDER).is_dir():
        return [(QUARTERED_CIRCLE, output)]
    raise SdtuneError(f"{output} holds no comparison (neither subjects/ nor runs/); give an `sdtune compare` "
                      "output folder.")


def references(subject: Subject, folder: Path) -> list:
    """The subject's instance images as the comparison wrote them (rendered afresh where they are gone)."""
    from PIL import Image

    files = sorted((folder / SUBJECT_FOLDER).glob("*.png"))
    return [Image.open(f).convert("RGB") for f in files] or subject.instance_images()


def pairs(output: str | Path, prompt_type: str = HEADLINE_TYPE) -> list[Pair]:
    """Every finished (subject, row) of the folder, scored on its last evaluation images of `prompt_type`."""
    found = []
    for subject, folder in subject_folders(Path(output)):
        refs = references(subject, folder)
        known = {p: kind for kind, listed in subject.prompts.items() for p in listed}
        runs = folder / RUNS_FOLDER
        rows = sorted(p for p in runs.iterdir() if p.is_dir() and p.name[0] != "." and p.name != "class-images") \
            if runs.is_dir() else []  # a comparison still running has subjects without runs yet
        for row in rows:
            exact, similar = [], []
            for seed in sorted(row.glob("seed-*")):
                steps = sorted(seed.glob("step-*.npz"))
                if not steps or not (seed / "job.json").is_file():
                    continue
                job = json.loads((seed / "job.json").read_text())
                prompts = fill(job["eval"]["prompts"], subject.token, job["class_word"])
                data = load_samples(steps[-1])
                pick = np.array([known.get(prompts[j]) == prompt_type for j in data["subject_prompt"]], bool)
                if not pick.any():  # a folder from before prompt types, or a --config's own prompts
                    continue
                images, asked = data["subject"][pick], [prompts[j] for j in data["subject_prompt"][pick]]
                exact += [r.score for r in subject.read(images)]
                similar += list(similarity(images, refs, [parse_caption(p)["size"] is not None for p in asked]))
            if exact:
                found.append(Pair(subject.name, row.name, float(np.mean(exact)), float(np.mean(similar)),
                                  len(exact)))
    return found


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties share their mean rank)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def report(output: str | Path, prompt_type: str = HEADLINE_TYPE) -> str:
    """The table of pairs and the Spearman correlation, as text."""
    found = pairs(output, prompt_type)
    if len(found) < 2:
        raise SdtuneError(f"{output} has fewer than two finished rows with {prompt_type} images to rank.")
    lines = [f"{'subject':18} {'row':22} {'exact':>7} {'similar':>7} {'n':>5}"]
    lines += [f"{p.subject:18} {p.row:22} {p.exact:7.3f} {p.similar:7.3f} {p.n:5d}" for p in found]
    for name in dict.fromkeys(p.subject for p in found):
        own = [p for p in found if p.subject == name]
        if len(own) > 2:
            rho = spearman([p.exact for p in own], [p.similar for p in own])
            lines.append(f"Spearman within {name} ({len(own)} rows): {rho:.3f}")
    rho = spearman([p.exact for p in found], [p.similar for p in found])
    lines.append(f"Spearman over {len(found)} (subject, row) pairs, {prompt_type} prompts: {rho:.3f}")
    return "\n".join(lines)
