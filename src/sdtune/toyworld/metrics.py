"""Toy-world analogues of the DreamBooth paper's metrics, each a value with a 95% bootstrap interval, for
any builtin subject (default: the first, the quartered circle).

- subject_fidelity   (DINO / CLIP-I): how much generated images show the subject (its scorer, 0..1).
- prompt_fidelity    (CLIP-T): share of the attributes a prompt names (background, position, size, colour,
                     shape) that the image honours, leaving out those the identifier stands for.
- prior_preservation (PRES, turned so higher is better): share of class-word images that show a plain member
                     of the class as prompted, not the subject.
- diversity          (DIV): mean pixel distance between images of the same prompt.

by_prompt_type gives the first two per prompt type of the subject and prior preservation on its class
prompts (see subjects.PROMPT_TYPES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sdtune.toyworld.captions import parse_caption
from sdtune.toyworld.evaluate import as_float_batch, read_images
from sdtune.toyworld.subjects import Subject

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    """A metric's value over n images and its bootstrap confidence interval [low, high]."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def stratified_mean(groups: Sequence[Sequence[float]], seed: int = 0) -> Estimate:
    """Mean of the groups' means (each group, such as a subject, weighs the same however many images it has),
    with a bootstrap that resamples within each group; one group gives exactly bootstrap_mean."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if len(arrays) <= 1:
        return bootstrap_mean(arrays[0] if arrays else [], seed)
    rng = np.random.default_rng(seed)
    means = np.mean([a[rng.integers(0, len(a), (N_BOOT, len(a)))].mean(axis=1) for a in arrays], axis=0)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(np.mean([a.mean() for a in arrays])), float(lo), float(hi), sum(len(a) for a in arrays))


def bootstrap_mean(scores: Sequence[float], seed: int = 0) -> Estimate:
    """Mean of per-image scores with a percentile bootstrap interval (seeded, so reports are repeatable)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, len(s), (N_BOOT, len(s)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(s.mean()), float(lo), float(hi), len(s))


def _or_default(subject: Subject | None) -> Subject:
    from sdtune.toyworld.catalogue import QUARTERED_CIRCLE

    return subject or QUARTERED_CIRCLE


def subject_fidelity(images, subject: Subject | None = None) -> Estimate:
    """Mean subject score of the images (by the subject's own scorer)."""
    return bootstrap_mean([r.score for r in _or_default(subject).read(images)])


def prompt_scores(images, prompts: Sequence[str], subject: Subject | None = None) -> list[float]:
    """Per image, the share of the prompt's named attributes the image shows. For prompts with an identifier
    the attributes it stands for (the subject's identity: colour, and shape or size where the look fixes
    them) do not count: they belong to the subject, not the prompt."""
    identity = _or_default(subject).identity
    readings = read_images(images)
    scores = []
    for reading, prompt in zip(readings, prompts, strict=True):
        asked = parse_caption(prompt)
        keys = [k for k in ("background", "position", "size", "colour", "shape")
                if not (asked["identifier"] and k in identity)]
        named = [k for k in keys if asked[k] is not None]
        got = reading.as_dict()
        scores.append(float(np.mean([got[k] == asked[k] for k in named])) if named else 1.0)
    return scores


def prompt_fidelity(images, prompts: Sequence[str], subject: Subject | None = None) -> Estimate:
    """Mean share of prompted attributes honoured (see prompt_scores)."""
    return bootstrap_mean(prompt_scores(images, prompts, subject))


def prior_preservation(images, prompts: Sequence[str], subject: Subject | None = None) -> Estimate:
    """Share of class-word images showing a plain object of the prompted class (not the subject) in the
    prompted object and background colours, and size where the prompt names one."""
    return bootstrap_mean(prior_scores(images, prompts, subject))


def prior_scores(images, prompts: Sequence[str], subject: Subject | None = None) -> list[float]:
    """Per class-word image, 1 where it shows what prior_preservation asks for, else 0."""
    readings, subject_readings = read_images(images), _or_default(subject).read(images)
    ok = []
    for reading, subj, prompt in zip(readings, subject_readings, prompts, strict=True):
        asked = parse_caption(prompt)
        good = reading.shape == asked["shape"] and not subj.is_subject
        for key in ("colour", "background", "size"):
            good &= asked[key] is None or reading.as_dict()[key] == asked[key]
        ok.append(float(good))
    return ok


def by_prompt_type(images, prompts: Sequence[str], subject: Subject,
                   types: Sequence[str] | None = None) -> dict[str, dict[str, Estimate]]:
    """Per prompt type present among `prompts`: subject and prompt fidelity for the identifier's types, prior
    preservation for the class prompts. Each prompt's type is the subject's (or given in `types`)."""
    x = as_float_batch(images)
    kinds = list(types) if types is not None else [subject.type_of(p) for p in prompts]
    out: dict[str, dict[str, Estimate]] = {}
    for kind in dict.fromkeys(kinds):
        pick = np.flatnonzero(np.array(kinds) == kind)
        chosen = [prompts[i] for i in pick]
        if kind == "class":
            out[kind] = {"prior_preservation": prior_preservation(x[pick], chosen, subject)}
        else:
            out[kind] = {"subject_fidelity": subject_fidelity(x[pick], subject),
                         "prompt_fidelity": prompt_fidelity(x[pick], chosen, subject)}
    return out


def _pair_distances(x: torch.Tensor) -> np.ndarray:
    """RMS pixel distance between every pair of images [n,3,H,W] at half resolution, [n,n] in [0,1]."""
    if x.shape[-1] >= 32:
        x = torch.nn.functional.avg_pool2d(x, 2)
    flat = x.flatten(1)
    return (torch.cdist(flat, flat) / flat.shape[1] ** 0.5).numpy()


def diversity(images, prompts: Sequence[str], seed: int = 0) -> Estimate:
    """Mean pairwise distance among images of the same prompt, averaged over prompts; the interval
    resamples images within each prompt (pairs of one image with itself are left out)."""
    x = as_float_batch(images)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    mats = [_pair_distances(x[idx]) for idx in groups.values() if len(idx) > 1]
    if not mats:
        return Estimate(float("nan"), float("nan"), float("nan"), len(prompts))

    def value(samples: list[np.ndarray]) -> float:
        vals = []
        for d, pick in zip(mats, samples):
            off = pick[:, None] != pick[None, :]
            vals.append(d[np.ix_(pick, pick)][off].mean() if off.any() else 0.0)
        return float(np.mean(vals))

    point = value([np.arange(len(d)) for d in mats])
    rng = np.random.default_rng(seed)
    boots = [value([rng.integers(0, len(d), len(d)) for d in mats]) for _ in range(N_BOOT // 4)]
    lo, hi = np.quantile(boots, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(point, float(lo), float(hi), sum(len(d) for d in mats))
