"""Quality of a row's evaluation images, pooled over seeds: the toy-world evaluators on the builtin subject,
the DreamBooth paper's DINO / CLIP-I / CLIP-T on real subjects (columns whose model is missing say why)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SdtuneError
from ..toyworld import similarity
from ..toyworld.metrics import Estimate


@dataclass(frozen=True)
class Metric:
    """A quality column: key in results.json, label in the report, and what it measures."""

    key: str
    label: str
    measures: str


TOY_METRICS = (
    Metric("subject_fidelity", "Subject fidelity", "toy-world subject score (0..1; the analogue of DINO / CLIP-I) "
           "of the images of prompts that change one thing the subject's images never show (a new background, "
           "position or size), as DreamBench's recontextualisation prompts do"),
    Metric("subject_fidelity_hard", "Subject fidelity, two new factors", "the same score with a new background "
           "and a new position at once"),
    Metric("prompt_fidelity", "Prompt fidelity", "share of the background, position and size each one-new-factor "
           "prompt asks for that its image shows (and the class, for a style; the analogue of CLIP-T)"),
    Metric("prior_preservation", "Prior preservation", "share of class-word images showing a plain class object "
           "as prompted, not the subject (PRES turned so higher is better)"),
    Metric("diversity", "Diversity", "mean pixel distance between images of the same one-new-factor prompt (DIV)"),
)
# A subject of one's own on the builtin model: its subject fidelity is the similarity to its images.
OWN_METRICS = (
    Metric("subject_fidelity", "Subject fidelity", f"{similarity.DESCRIPTION}; the analogue of DINO, on the "
           "images of prompts that change one thing your images never show (a new background or position)"),
    *TOY_METRICS[1:],
)
REAL_METRICS = (
    Metric("dino", "DINO", "mean DINO cosine similarity of generated to real subject images"),
    Metric("clip_i", "CLIP-I", "mean CLIP image cosine similarity of generated to real subject images"),
    Metric("clip_t", "CLIP-T", "CLIP cosine similarity of each image to its prompt (identifier left out)"),
    Metric("prior_preservation", "Prior preservation", "1 - DINO similarity of class-prompt images to the "
           "subject (1 - PRES; higher: the class word still means the class)"),
    Metric("diversity", "Diversity", "1 - DINO similarity between images of the same prompt (like DIV)"),
)


@dataclass
class Samples:
    """One seed's images at one evaluation point (see sampling.save_samples)."""

    seed: int
    subject: np.ndarray
    subject_prompt: np.ndarray
    class_images: np.ndarray
    class_prompt: np.ndarray


def _pooled(samples: list[Samples]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Images of all seeds together; same-prompt groups are kept apart per seed."""
    subject = np.concatenate([s.subject for s in samples])
    prompts = np.concatenate([s.subject_prompt for s in samples])
    groups = [f"{s.seed}:{p}" for s in samples for p in s.subject_prompt]
    class_images = np.concatenate([s.class_images for s in samples])
    class_prompts = np.concatenate([s.class_prompt for s in samples])
    return subject, prompts, groups, class_images, class_prompts


@dataclass
class Evidence:
    """One subject's images at one evaluation point as per-image scores of each metric, plus the images and
    same-prompt groups diversity is measured on and the subject scores per prompt type: what pooling over
    several subjects needs."""

    scores: dict[str, np.ndarray]
    images: np.ndarray
    groups: list[str]
    by_type: dict[str, np.ndarray]


def pooled_by_type(evidence: list[Evidence]) -> dict[str, dict[str, Estimate]]:
    """Subject fidelity per prompt type pooled over subjects (each subject that has the type weighs the same)."""
    from ..toyworld import metrics

    kinds = dict.fromkeys(kind for e in evidence for kind in e.by_type)
    return {kind: {"subject_fidelity": metrics.stratified_mean([e.by_type[k] for e in evidence for k in e.by_type
                                                                if k == kind])} for kind in kinds}


def estimates(evidence: list[Evidence]) -> dict[str, Estimate | None]:
    """The toy metrics of one subject's evidence, or pooled over several (each subject weighs the same)."""
    from ..toyworld import metrics

    out: dict[str, Estimate | None] = {
        key: metrics.stratified_mean([e.scores[key] for e in evidence]) if any(len(e.scores[key]) for e in evidence)
        else None for key in evidence[0].scores}
    images = np.concatenate([e.images for e in evidence])
    groups = [f"{k}|{g}" for k, e in enumerate(evidence) for g in e.groups]
    out["diversity"] = metrics.diversity(images, groups) if len(images) else None
    return out


class ToyJudge:
    """The toy world's evaluators for one builtin subject, or for one's own on the builtin model (own_subject.py,
    with OWN_METRICS); prompts are the canonical ones (the subject's own token), whatever word a row was
    trained under. Each prompt has the subject's prompt type ("custom" for
    one it does not list); the headline metrics read the one-new-factor prompts (all, when there are none)."""

    def __init__(self, subject, prompts: list[str], class_prompts: list[str], metrics: tuple = TOY_METRICS):
        from ..toyworld.subjects import HARD_TYPE, HEADLINE_TYPE

        self.subject, self.prompts, self.class_prompts, self.metrics = subject, prompts, class_prompts, metrics
        known = {p: kind for kind, listed in subject.prompts.items() for p in listed}
        self.types = [known.get(p, "custom") for p in prompts]
        self.headline = HEADLINE_TYPE if HEADLINE_TYPE in self.types else None
        self.hard = HARD_TYPE
        self.missing: dict[str, str] = {}
        if HARD_TYPE not in self.types:
            self.missing["subject_fidelity_hard"] = "no evaluation prompt changes two things at once"

    def evidence(self, samples: list[Samples]) -> Evidence:
        from ..toyworld import metrics

        subject, prompts, groups, class_images, class_prompts = _pooled(samples)
        kinds = np.array([self.types[i] for i in prompts])
        head = np.ones(len(kinds), bool) if self.headline is None else kinds == self.headline
        asked = [self.prompts[i] for i in prompts[head]]
        scores = np.array([r.score for r in self.subject.read(subject)]) if len(subject) else np.zeros(0)
        prior = (metrics.prior_scores(class_images, [self.class_prompts[i] for i in class_prompts], self.subject)
                 if len(class_images) else [])
        return Evidence({"subject_fidelity": scores[head], "subject_fidelity_hard": scores[kinds == self.hard],
                         "prompt_fidelity": np.array(metrics.prompt_scores(subject[head], asked, self.subject)
                                                     if head.any() else []),
                         "prior_preservation": np.array(prior)},
                        subject[head], [g for g, h in zip(groups, head) if h],
                        {kind: scores[kinds == kind] for kind in dict.fromkeys(kinds)})

    def score(self, samples: list[Samples]) -> dict[str, Estimate | None]:
        return estimates([self.evidence(samples)])

    def by_type(self, samples: list[Samples]) -> dict[str, dict[str, Estimate]]:
        """Subject and prompt fidelity per prompt type, prior preservation on the class prompts."""
        from ..toyworld import metrics

        subject, prompts, _, class_images, class_prompts = _pooled(samples)
        out = metrics.by_prompt_type(subject, [self.prompts[i] for i in prompts], self.subject,
                                     [self.types[i] for i in prompts]) if len(subject) else {}
        if len(class_images):
            out["class"] = {"prior_preservation": metrics.prior_preservation(
                class_images, [self.class_prompts[i] for i in class_prompts], self.subject)}
        return out

    def ceiling(self, vae, per_prompt: int, seed: int = 0) -> list[Samples]:
        """The subject drawn as every evaluation prompt asks, through the base model's VAE: what a method
        that learned the subject perfectly could show (no class images)."""
        from ..toyworld.subjects import vae_round_trip

        renders = self.subject.prompt_renders(self.prompts, per_prompt, seed)
        decoded = (vae_round_trip(vae, renders) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        index = np.repeat(np.arange(len(self.prompts)), per_prompt)
        empty = np.zeros((0, *decoded.shape[1:]), np.uint8)
        return [Samples(seed, decoded, index, empty, np.zeros(0, np.int64))]


class RealJudge:
    """DINO, CLIP-I, CLIP-T, 1 - PRES and diversity against the user's subject images."""

    metrics = REAL_METRICS

    def __init__(self, references: list, clip_texts: list[str], clip_model: str | None, dino_model: str | None):
        from ..metrics import load_encoder

        self.missing: dict[str, str] = {}
        self.encoders = {}
        for kind, spec, keys in (("clip", clip_model, ("clip_i", "clip_t")),
                                 ("dino", dino_model, ("dino", "prior_preservation", "diversity"))):
            try:
                if not spec:
                    raise SdtuneError(f"no --{kind}-model given")
                self.encoders[kind] = load_encoder(kind, spec)
            except SdtuneError as exc:
                self.missing.update({key: str(exc).rstrip(".") for key in keys})
        self.references = {k: e.images(references) for k, e in self.encoders.items()}
        self.texts = self.encoders["clip"].texts(clip_texts) if "clip" in self.encoders else None

    def by_type(self, samples: list[Samples]) -> dict:
        """Nothing: a subject of one's own has no prompt types."""
        return {}

    def ceiling(self, vae, per_prompt: int, seed: int = 0) -> None:
        """Nothing: a subject of one's own cannot be rendered."""
        return None

    def score(self, samples: list[Samples]) -> dict[str, Estimate | None]:
        from .. import metrics

        subject, prompts, groups, class_images, _ = _pooled(samples)
        out: dict[str, Estimate | None] = {m.key: None for m in self.metrics}
        if "clip" in self.encoders:
            emb = self.encoders["clip"].images(subject)
            out["clip_i"] = metrics.image_similarity(emb, self.references["clip"])
            out["clip_t"] = metrics.text_similarity(emb, self.texts[prompts])
        if "dino" in self.encoders:
            emb = self.encoders["dino"].images(subject)
            out["dino"] = metrics.image_similarity(emb, self.references["dino"])
            out["prior_preservation"] = metrics.subject_distance(self.encoders["dino"].images(class_images),
                                                                 self.references["dino"])
            out["diversity"] = metrics.distinctness(emb, groups)
        return out
