"""Toy-world analogues of the DreamBooth paper's metrics, each a value with a 95% bootstrap interval.

- subject_fidelity   (DINO / CLIP-I): how much generated images show the subject (subject score, 0..1).
- prompt_fidelity    (CLIP-T): share of the attributes a prompt names (background, position, size, colour,
                     shape) that the image honours.
- prior_preservation (PRES, turned so higher is better): share of class-word images that show a plain member
                     of the class in the prompted colours, not the subject.
- diversity          (DIV): mean pixel distance between images of the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sdtune.toyworld.captions import parse_caption
from sdtune.toyworld.evaluate import as_float_batch, read_images
from sdtune.toyworld.subject import CLASS_WORD, read_subject

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


def bootstrap_mean(scores: Sequence[float], seed: int = 0) -> Estimate:
    """Mean of per-image scores with a percentile bootstrap interval (seeded, so reports are repeatable)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, len(s), (N_BOOT, len(s)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(s.mean()), float(lo), float(hi), len(s))


def subject_fidelity(images) -> Estimate:
    """Mean subject score of the images (the subject is the quartered yellow/purple circle)."""
    return bootstrap_mean([r.score for r in read_subject(images)])


def prompt_scores(images, prompts: Sequence[str]) -> list[float]:
    """Per image, the share of the prompt's named attributes the image shows. For prompts with an identifier
    only background, position and size count (colour and shape belong to the subject, not the prompt)."""
    readings = read_images(images)
    scores = []
    for reading, prompt in zip(readings, prompts, strict=True):
        asked = parse_caption(prompt)
        keys = ["background", "position", "size"] + ([] if asked["identifier"] else ["colour", "shape"])
        named = [k for k in keys if asked[k] is not None]
        got = reading.as_dict()
        scores.append(float(np.mean([got[k] == asked[k] for k in named])) if named else 1.0)
    return scores


def prompt_fidelity(images, prompts: Sequence[str]) -> Estimate:
    """Mean share of prompted attributes honoured (see prompt_scores)."""
    return bootstrap_mean(prompt_scores(images, prompts))


def prior_preservation(images, prompts: Sequence[str]) -> Estimate:
    """Share of class-word images showing a plain class object (not the subject) in the prompted object and
    background colours."""
    readings, subject = read_images(images), read_subject(images)
    ok = []
    for reading, subj, prompt in zip(readings, subject, prompts, strict=True):
        asked = parse_caption(prompt)
        good = reading.shape == (asked["shape"] or CLASS_WORD) and not subj.is_subject
        for key in ("colour", "background"):
            good &= asked[key] is None or reading.as_dict()[key] == asked[key]
        ok.append(float(good))
    return bootstrap_mean(ok)


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
