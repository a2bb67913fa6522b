"""Quality of a row's evaluation images, pooled over seeds: the toy-world evaluators on the builtin subject,
the DreamBooth paper's DINO / CLIP-I / CLIP-T on real subjects (columns whose model is missing say why)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SdtuneError
from ..toyworld.metrics import Estimate


@dataclass(frozen=True)
class Metric:
    """A quality column: key in results.json, label in the report, and what it measures."""

    key: str
    label: str
    measures: str


TOY_METRICS = (
    Metric("subject_fidelity", "Subject fidelity", "toy-world subject score of the subject prompts' images "
           "(0..1; the analogue of DINO / CLIP-I)"),
    Metric("prompt_fidelity", "Prompt fidelity", "share of the background, position and size each subject "
           "prompt asks for that its image shows (the analogue of CLIP-T)"),
    Metric("prior_preservation", "Prior preservation", "share of class-word images showing a plain class object "
           "in the prompted colours, not the subject (PRES turned so higher is better)"),
    Metric("diversity", "Diversity", "mean pixel distance between images of the same prompt (DIV)"),
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


class ToyJudge:
    """The toy world's evaluators; prompts are the canonical ones (the subject's own token), whatever word
    a row was trained under."""

    metrics = TOY_METRICS

    def __init__(self, prompts: list[str], class_prompts: list[str]):
        self.prompts, self.class_prompts = prompts, class_prompts
        self.missing: dict[str, str] = {}

    def score(self, samples: list[Samples]) -> dict[str, Estimate]:
        from ..toyworld import metrics

        subject, prompts, groups, class_images, class_prompts = _pooled(samples)
        return {
            "subject_fidelity": metrics.subject_fidelity(subject),
            "prompt_fidelity": metrics.prompt_fidelity(subject, [self.prompts[i] for i in prompts]),
            "prior_preservation": metrics.prior_preservation(class_images, [self.class_prompts[i] for i in class_prompts]),
            "diversity": metrics.diversity(subject, groups),
        }


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
