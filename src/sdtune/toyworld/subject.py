"""The first builtin subject under its long-standing names: a circle quartered in yellow and purple, which no
pretraining caption can ask for (catalogue.QUARTERED_CIRCLE; the other subjects are in the catalogue).

Its class word is "circle" (the base model draws plain circles in any one colour); its identifier is the
rare token "sks". Five instance images show it large on blue, green or white backgrounds in the center,
top left or bottom right; the evaluation prompts put it on red, orange or black backgrounds at the top
right or bottom left, which the instance images never show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdtune.toyworld.captions import caption
from sdtune.toyworld.catalogue import QUARTERED_CIRCLE as SUBJECT
from sdtune.toyworld.looks import THRESHOLD as SUBJECT_THRESHOLD
from sdtune.toyworld.looks import LookReading as SubjectReading
from sdtune.toyworld.world import Scene

__all__ = ["TOKEN", "CLASS_WORD", "COLOUR_A", "COLOUR_B", "INSTANCE_PROMPT", "CLASS_PROMPT", "INSTANCE_LAYOUT",
           "HELD_OUT_BACKGROUNDS", "HELD_OUT_POSITIONS", "EVAL_PROMPTS", "CLASS_EVAL_PROMPTS", "SUBJECT_THRESHOLD",
           "SubjectReading", "subject_scene", "instance_scenes", "instance_images", "write_instance_images",
           "write_subject_folder", "subject_renders", "read_subject"]

TOKEN = SUBJECT.token
CLASS_WORD = SUBJECT.class_word
COLOUR_A, COLOUR_B = SUBJECT.look.colours  # A on the top-left and bottom-right quarters, B on the others
INSTANCE_PROMPT = SUBJECT.instance_prompt  # "a sks circle"
CLASS_PROMPT = caption(CLASS_WORD)  # "a circle"
INSTANCE_LAYOUT: tuple[tuple[str, str], ...] = tuple((c.background, c.position) for c in SUBJECT.instances)
HELD_OUT_BACKGROUNDS = SUBJECT.held_out_backgrounds
HELD_OUT_POSITIONS = SUBJECT.held_out_positions
EVAL_PROMPTS: tuple[str, ...] = SUBJECT.prompts["two_factors"]  # a held-out background and position at once
CLASS_EVAL_PROMPTS: tuple[str, ...] = SUBJECT.prompts["class"]


def subject_scene(background: str, position: str, rng: np.random.Generator | None = None) -> Scene:
    """The subject on a background at a position, with the world's usual jitter when rng is given."""
    return SUBJECT.look.scene(CLASS_WORD, background, position, rng=rng)


def instance_scenes(seed: int = 0) -> list[Scene]:
    """The five instance scenes (fixed layout, seeded jitter)."""
    return SUBJECT.instance_scenes(seed)


def instance_images(size: int = 32, seed: int = 0) -> list:
    """The five instance images as PIL images."""
    return SUBJECT.instance_images(size, seed)


def write_instance_images(folder: str | Path, size: int = 32, seed: int = 0, captions: bool = False) -> list[Path]:
    """Write the instance images as sks_00.png ... into folder (created), all or none; with captions=True also
    a same-named .txt holding each image's full caption. Returns the image paths."""
    return SUBJECT.write_instance_images(folder, size, seed, captions)


def write_subject_folder(folder: str | Path) -> list[Path]:
    """The instance images with captions in `folder`, for `sdtune subject` (see Subject.write_folder)."""
    return SUBJECT.write_folder(folder)


def subject_renders(n: int, seed: int, backgrounds=None, positions=None, size: int = 32) -> torch.Tensor:
    """n jittered renders of the subject (uint8 [n,3,H,W]) on the given backgrounds/positions (default: all
    backgrounds not in the subject's colours, all positions)."""
    return SUBJECT.renders(n, seed, backgrounds, positions, size)


def read_subject(images, obj_threshold: float = 0.2) -> list[SubjectReading]:
    """Score how much each image's object looks like the subject (0 = plain or absent, ~1 = the subject): the
    object is split into quarters at its centroid; the subject has equal diagonal quarters and very different
    neighbouring ones, in its two colours (see looks.read_look)."""
    from sdtune.toyworld.looks import read_look

    return read_look(images, SUBJECT.look, obj_threshold)
