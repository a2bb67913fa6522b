"""The builtin subject: a circle quartered in yellow and purple, which no pretraining caption can ask for.

Its class word is "circle" (the base model draws plain circles in any one colour); its identifier is the
rare token "sks". Five instance images show it large on blue, green or white backgrounds in the center,
top left or bottom right; the evaluation prompts put it on red, orange or black backgrounds at the top
right or bottom left, which the instance images never show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.toyworld.captions import caption
from sdtune.toyworld.evaluate import MIN_AREA, as_float_batch, background_and_coverage, match_shapes
from sdtune.toyworld.world import COLOURS, SHAPES, Scene, render_batch, scenes_to_batch, to_pil

TOKEN = "sks"
CLASS_WORD = "circle"
COLOUR_A, COLOUR_B = "yellow", "purple"  # A on the top-left and bottom-right quarters, B on the others
INSTANCE_PROMPT = caption(CLASS_WORD, identifier=TOKEN)  # "a sks circle"
CLASS_PROMPT = caption(CLASS_WORD)  # "a circle"
INSTANCE_LAYOUT: tuple[tuple[str, str], ...] = (
    ("blue", "center"), ("green", "top left"), ("white", "bottom right"), ("green", "center"),
    ("blue", "bottom right"),
)
HELD_OUT_BACKGROUNDS: tuple[str, ...] = ("red", "orange", "black")
HELD_OUT_POSITIONS: tuple[str, ...] = ("top right", "bottom left")
EVAL_PROMPTS: tuple[str, ...] = tuple(
    caption(CLASS_WORD, position=p, background=b, identifier=TOKEN)
    for b in HELD_OUT_BACKGROUNDS for p in HELD_OUT_POSITIONS
)
# Class-word prompts for prior preservation: plain circles, including the subject's own two colours.
CLASS_EVAL_PROMPTS: tuple[str, ...] = tuple(
    caption(CLASS_WORD, colour=c, background=b)
    for c, b in (("yellow", "blue"), ("purple", "white"), ("red", "green"), ("white", "black"),
                 ("blue", "orange"), ("green", "red"))
)
SUBJECT_THRESHOLD = 0.5


def subject_scene(background: str, position: str, rng: np.random.Generator | None = None) -> Scene:
    """The subject on a background at a position, with the world's usual jitter when rng is given."""
    j = (lambda a: float(rng.uniform(-a, a))) if rng is not None else (lambda a: 0.0)
    return Scene(CLASS_WORD, COLOUR_A, background, "large", position, dx=j(0.02), dy=j(0.02),
                 scale=1 + j(0.08), pattern="quadrants", colour2=COLOUR_B, tint=(j(0.03), j(0.03)))


def instance_scenes(seed: int = 0) -> list[Scene]:
    """The five instance scenes (fixed layout, seeded jitter)."""
    rng = np.random.default_rng(seed)
    return [subject_scene(bg, pos, rng) for bg, pos in INSTANCE_LAYOUT]


def instance_images(size: int = 32, seed: int = 0) -> list:
    """The five instance images as PIL images."""
    return [to_pil(im) for im in render_batch(scenes_to_batch(instance_scenes(seed)), size)]


def write_instance_images(folder: str | Path, size: int = 32, seed: int = 0, captions: bool = False) -> list[Path]:
    """Write the instance images as sks_00.png ... into folder (created), all or none; with captions=True also
    a same-named .txt holding each image's full caption. Returns the image paths."""
    from sdtune.artifacts import atomic_write_many

    writes = []
    for i, (scene, img) in enumerate(zip(instance_scenes(seed), instance_images(size, seed))):
        path = Path(folder) / f"{TOKEN}_{i:02d}.png"
        writes.append((path, img.save))
        if captions:
            text = caption(CLASS_WORD, position=scene.position, background=scene.background, identifier=TOKEN)
            writes.append((path.with_suffix(".txt"), lambda tmp, text=text: tmp.write_text(text + "\n")))
    return [p for p in atomic_write_many(writes) if p.suffix == ".png"]


def write_subject_folder(folder: str | Path) -> list[Path]:
    """The instance images with captions in `folder`, for `sdtune subject`: refused where the folder holds
    files of its own (mixed into the subject they would be trained on); rewriting its own files is fine."""
    from sdtune.errors import SdtuneError
    from sdtune.outputs import check_folder_path

    folder = Path(folder)
    check_folder_path(folder, "Subject folder")
    names = {f"{TOKEN}_{i:02d}{suffix}" for i in range(len(INSTANCE_LAYOUT)) for suffix in (".png", ".txt")}
    others = sorted(p.name for p in folder.iterdir() if p.name not in names) if folder.is_dir() else []
    if others:
        raise SdtuneError(f"{folder} already holds other files ({others[0]}, ...); choose an empty or new folder.")
    return write_instance_images(folder, captions=True)


def subject_renders(n: int, seed: int, backgrounds=None, positions=None, size: int = 32) -> torch.Tensor:
    """n jittered renders of the subject (uint8 [n,3,H,W]) on the given backgrounds/positions (default: all
    backgrounds not in the subject's colours, all positions)."""
    from sdtune.toyworld.world import POSITION_NAMES

    rng = np.random.default_rng(seed)
    bgs = backgrounds or [c for c in COLOURS if c not in (COLOUR_A, COLOUR_B)]
    poss = positions or list(POSITION_NAMES)
    scenes = [subject_scene(bgs[rng.integers(len(bgs))], poss[rng.integers(len(poss))], rng) for _ in range(n)]
    return render_batch(scenes_to_batch(scenes), size)


@dataclass(frozen=True)
class SubjectReading:
    """Evidence for the subject in one image: quartering contrast, colour match, circle shape, and score."""

    contrast: float
    colour_match: float
    is_circle: bool
    score: float

    @property
    def is_subject(self) -> bool:
        return self.score >= SUBJECT_THRESHOLD


def read_subject(images, obj_threshold: float = 0.2) -> list[SubjectReading]:
    """Score how much each image's object looks like the subject (0 = plain or absent, ~1 = the subject).

    The object (pixels far from the background) is split into quarters at its centroid; the subject has
    equal diagonal quarters and very different neighbouring ones, in its two colours.
    """
    x = as_float_batch(images)
    n, _, h, w = x.shape
    _, _, dist = background_and_coverage(x)
    mask = (dist > obj_threshold).float()
    area = mask.sum(dim=(1, 2)) / (h * w)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    mass = mask.sum(dim=(1, 2)).clamp(min=1)
    cx = (mask.sum(dim=1) * xs).sum(dim=1) / mass
    cy = (mask.sum(dim=2) * ys).sum(dim=1) / mass
    shape_idx, _, _ = match_shapes(mask, area, cx, cy)
    a_rgb = torch.tensor(COLOURS[COLOUR_A], dtype=torch.float32) / 255
    b_rgb = torch.tensor(COLOURS[COLOUR_B], dtype=torch.float32) / 255
    span = float((a_rgb - b_rgb).norm())
    margin = 1.0 / max(h, w)
    out = []
    for i in range(n):
        if area[i] < MIN_AREA:
            out.append(SubjectReading(0.0, 0.0, False, 0.0))
            continue
        left, top = xs.view(1, -1) < cx[i] - margin, ys.view(-1, 1) < cy[i] - margin
        right, bottom = xs.view(1, -1) > cx[i] + margin, ys.view(-1, 1) > cy[i] + margin
        quarters = [top & left, top & right, bottom & right, bottom & left]  # TL, TR, BR, BL
        means = []
        for q in quarters:
            wgt = mask[i] * q
            means.append((x[i] * wgt).sum(dim=(1, 2)) / wgt.sum().clamp(min=1))
        diag_a, diag_b = (means[0] + means[2]) / 2, (means[1] + means[3]) / 2
        within = ((means[0] - means[2]).norm() + (means[1] - means[3]).norm()) / 2
        contrast = float(((diag_a - diag_b).norm() - within).clamp(min=0) / span)
        off = (diag_a - a_rgb).norm() ** 2 + (diag_b - b_rgb).norm() ** 2
        colour_match = float(torch.exp(-off / (2 * 0.25 ** 2)))
        is_circle = SHAPES[shape_idx[i]] == CLASS_WORD
        score = min(1.0, contrast) * (0.5 + 0.5 * colour_match) * (1.0 if is_circle else 0.6)
        out.append(SubjectReading(contrast, colour_match, is_circle, score))
    return out
