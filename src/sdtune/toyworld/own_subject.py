"""A subject of one's own on the builtin model, evaluated like the builtin subjects without knowing its look.

Its evaluation prompts follow the builtin subjects' rules (subjects.Subject.prompts) from what the evaluators
read in its images: each image's background and position is an instance context; the backgrounds (clear of
the object's own colours) and positions no image shows make the one- and two-new-factor prompts. No prompt
asks for a new size: whether the size belongs to a subject of one's own is unknown, so the similarity counts
it. Subject fidelity is the similarity of each image's object to the images' objects (similarity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdtune.errors import SdtuneError
from sdtune.toyworld.conventions import CLASS, class_prompt_templates
from sdtune.toyworld.evaluate import as_float_batch, background_and_coverage, nearest_colour, read_images
from sdtune.toyworld.looks import Look
from sdtune.toyworld.similarity import OBJECT_DISTANCE, THRESHOLD, interior, similarity
from sdtune.toyworld.subjects import Context, Subject
from sdtune.toyworld.world import COLOUR_NAMES, POSITION_NAMES, SHAPES

NEW_BACKGROUNDS, NEW_POSITIONS = 3, 2  # as many as the builtin subjects' prompts use
CLASS_PROMPTS = 6
SIDE = 32  # the builtin model's resolution (training resizes every image to it)
OBJECT_COLOUR_SHARE = 0.1  # a palette colour covering this share of an object counts as one of its colours


@dataclass(frozen=True)
class SimilarityReading:
    """Evidence for the subject in one image: its similarity to the subject's images."""

    score: float

    @property
    def is_subject(self) -> bool:
        return self.score >= THRESHOLD


@dataclass(frozen=True)
class OwnSubject:
    """What the toy world's judge asks of a subject (prompts by type, identity, a reader), for one's own
    images: `contexts` holds the prompts (its look is only the object's main colour, which prompt fidelity
    leaves to the identifier), `references` the images subject fidelity compares with."""

    contexts: Subject
    references: torch.Tensor

    @property
    def prompts(self) -> dict[str, tuple[str, ...]]:
        return self.contexts.prompts

    @property
    def identity(self) -> tuple[str, ...]:
        return self.contexts.identity

    @property
    def token(self) -> str:
        return self.contexts.token

    def read(self, images) -> list[SimilarityReading]:
        """Each image's similarity to the subject's images."""
        return [SimilarityReading(float(s)) for s in similarity(images, self.references)]


def check_class_word(class_word: str) -> None:
    """The builtin model draws only the toy world's shapes: any other class word is refused in one sentence."""
    if class_word not in SHAPES:
        raise SdtuneError(f"The builtin model draws only the toy world's shapes ({', '.join(SHAPES)}), and "
                          f"--class-word {class_word} is none of them: name the shape your images show, or compare "
                          "on a real Stable Diffusion model with --model.")


def own_subject(images, class_word: str, token: str = "sks") -> OwnSubject:
    """The subject shown by `images` (PIL images or arrays) under `class_word` and identifier `token`."""
    check_class_word(class_word)
    x = as_float_batch([_rgb(im) for im in images])
    readings = [r for r in read_images(x) if r.shape is not None]
    if not readings:
        raise SdtuneError("None of the images shows one object on a plain background, which is all the builtin "
                          "model can draw; give toy-world images (see `sdtune subject`) or use a real model.")
    contexts = tuple(dict.fromkeys(Context(class_word, r.background, r.position) for r in readings))
    colours = object_colours(x) or {readings[0].colour: 1.0}  # objects too thin to have inner pixels: as read
    shown_backgrounds = {c.background for c in contexts}
    shown_positions = {c.position for c in contexts}
    main = max(colours, key=colours.get)
    subject = Subject(
        name="own", kind="own", description=f"the {class_word} in your images", token=token,
        class_word=class_word, look=Look(main), instances=contexts,
        held_out_backgrounds=tuple(c for c in COLOUR_NAMES if c not in shown_backgrounds | set(colours))[
            :NEW_BACKGROUNDS],
        held_out_positions=tuple(p for p in POSITION_NAMES if p not in shown_positions)[:NEW_POSITIONS],
        class_prompts=tuple(t.replace(CLASS, class_word) for t in class_prompt_templates()[:CLASS_PROMPTS]),
        new_size=None)
    return OwnSubject(subject, (x * 255).round().to(torch.uint8))


def object_colours(x: torch.Tensor) -> dict[str, float]:
    """The palette colours of the objects in images [N,3,H,W] with their share of the objects' inner pixels (those
    covering at least OBJECT_COLOUR_SHARE; edge pixels blend with the background)."""
    _, _, dist = background_and_coverage(x)
    mask = interior((dist > OBJECT_DISTANCE).float()).bool()
    labels = nearest_colour(x.permute(0, 2, 3, 1)[mask])
    counts = np.bincount(labels.numpy(), minlength=len(COLOUR_NAMES)) / max(1, int(mask.sum()))
    return {COLOUR_NAMES[k]: float(share) for k, share in enumerate(counts) if share >= OBJECT_COLOUR_SHARE}


def _rgb(image) -> np.ndarray:
    """An image as an HxWx3 uint8 array at the side the builtin model trains and draws at."""
    from PIL import Image

    pil = image if hasattr(image, "convert") else Image.fromarray(np.asarray(image))
    return np.asarray(pil.convert("RGB").resize((SIDE, SIDE), Image.BICUBIC))
