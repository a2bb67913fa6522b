"""A subject's look and the analytic scorer that tells it apart from plain objects (0 = plain or absent, ~1 =
the look), for any of the world's patterns, shapes and colours; it needs no training.

The object (pixels far from the background) is found as the evaluators find it, its shape and size matched
against the rendered templates. A two-colour look is then split into the pattern's parts, placed at the
object's own centre and radius (quarters for "quadrants", bands for "stripes", ...), each part a colour
region of the look: the look shows when the parts of one colour agree, the two colours differ, and they are
the look's colours. A plain look is one colour on one shape at one size, so its score is how close the
object's colour is. A wrong shape or (where the look fixes it) size scales the score down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sdtune.toyworld.evaluate import MIN_AREA, as_float_batch, background_and_coverage, match_shapes, \
    shape_geometry
from sdtune.toyworld.world import COLOURS, PATTERNS, RING_RADIUS_SQUARED, SHAPES, SIZES, STRIPE_HEIGHT, STRIPE_TOP, \
    Scene

THRESHOLD = 0.5  # a score at or above it counts as showing the look
WRONG_SHAPE = 0.6  # factor for a wrong shape: the look's colours on another object are half-way there
WRONG_SIZE = 0.4  # factor for a wrong size, where the look fixes it: below THRESHOLD even in the right colours
COLOUR_TOLERANCE = 0.25  # RGB distance (0..1 per channel) at which a colour's match falls to exp(-1/2)
SIZE_CUT = float(np.sqrt(np.prod(list(SIZES.values()))))  # the evaluators' small/large boundary (radius)


@dataclass(frozen=True)
class Look:
    """What the identifier stands for: colours and pattern, and the shape and size when they belong to it
    (None: any shape or size, as for a style)."""

    colour: str
    pattern: str = "plain"
    colour2: str | None = None
    shape: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS or (self.pattern == "plain") != (self.colour2 is None):
            raise ValueError(f"pattern {self.pattern!r} with colour2 {self.colour2!r} is no look")

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour,) if self.colour2 is None else (self.colour, self.colour2)

    def scene(self, shape: str, background: str, position: str, size: str = "large",
              rng: np.random.Generator | None = None) -> Scene:
        """The look on `shape` in a context, with the world's usual jitter when rng is given (the order of the
        draws is the one the first builtin subject's images were made with)."""
        j = (lambda a: float(rng.uniform(-a, a))) if rng is not None else (lambda a: 0.0)
        return Scene(shape, self.colour, background, self.size or size, position, dx=j(0.02), dy=j(0.02),
                     scale=1 + j(0.08), pattern=self.pattern, colour2=self.colour2, tint=(j(0.03), j(0.03)))


@dataclass(frozen=True)
class LookReading:
    """Evidence for the look in one image: pattern contrast (1 for a plain look), colour match, whether
    shape and size are the look's (True where the look leaves them open), and the score."""

    contrast: float
    colour_match: float
    right_shape: bool
    right_size: bool
    score: float

    @property
    def is_subject(self) -> bool:
        return self.score >= THRESHOLD


Grid = tuple[torch.Tensor, torch.Tensor]  # pixel-centre x [1,W] and y [H,1] in image fractions
# A pattern's parts: (colour index 0/1, pixel mask [H,W]) from the grid, the pattern's centre (px, py), its
# radius r and a margin (one pixel) kept clear of every boundary, where decoded images blend the colours.
PartRule = Callable[[Grid, float, float, float, float], list[tuple[int, torch.Tensor]]]


def _quadrant_parts(grid: Grid, px: float, py: float, r: float, m: float) -> list[tuple[int, torch.Tensor]]:
    xs, ys = grid
    left, top, right, bottom = xs < px - m, ys < py - m, xs > px + m, ys > py + m
    return [(0, top & left), (1, top & right), (0, bottom & right), (1, bottom & left)]


def _half_parts(grid: Grid, px: float, py: float, r: float, m: float) -> list[tuple[int, torch.Tensor]]:
    xs, ys = grid
    full = torch.ones_like(ys, dtype=torch.bool)
    return [(0, (xs < px - m) & full), (1, (xs > px + m) & full)]


def _stripe_parts(grid: Grid, px: float, py: float, r: float, m: float) -> list[tuple[int, torch.Tensor]]:
    xs, ys = grid
    full = torch.ones_like(xs, dtype=torch.bool)
    parts = []
    for band in range(round(-2 * STRIPE_TOP / STRIPE_HEIGHT)):  # the bands down to as far below the centre
        top = py + r * (STRIPE_TOP + STRIPE_HEIGHT * band)
        parts.append((band % 2, (ys > top + m) & (ys < top + r * STRIPE_HEIGHT - m) & full))
    return parts


def _ring_parts(grid: Grid, px: float, py: float, r: float, m: float) -> list[tuple[int, torch.Tensor]]:
    xs, ys = grid
    rho = ((xs - px) ** 2 + (ys - py) ** 2).sqrt()
    edge = RING_RADIUS_SQUARED ** 0.5 * r
    return [(1, rho < edge - m), (0, rho > edge + m)]


@dataclass(frozen=True)
class Split:
    """How a pattern is cut into parts: its rule; whether only the object's interior counts (pixels whose four
    neighbours are object too, unblended with the background: a part along the edge, like a ring's outside,
    would otherwise differ from an inner one on any plain object); whether it is cut at the area centroid
    rather than the shape's own centre."""

    parts: PartRule
    interior: bool = True
    at_centroid: bool = False


# Quarters are cut as the first builtin subject's scorer always cut them (its scores stay the same): at the
# area centroid, which lies off the shape's centre only for the heart, edge pixels included (every quarter
# has as much edge as the others).
SPLITS: dict[str, Split] = {"quadrants": Split(_quadrant_parts, interior=False, at_centroid=True),
                            "halves": Split(_half_parts), "stripes": Split(_stripe_parts), "ring": Split(_ring_parts)}


def _centre_offsets() -> list[tuple[float, float]]:
    """Each shape's area centroid relative to its own centre, in radii (0 for symmetric shapes, exactly)."""
    return [(round(ox, 2), round(oy, 2)) for _, ox, oy in shape_geometry()]


def read_look(images, look: Look, obj_threshold: float = 0.2) -> list[LookReading]:
    """Score how much each image's object shows `look` (see the module docstring)."""
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
    shape_idx, radius, _ = match_shapes(mask, area, cx, cy)
    rgb = [torch.tensor(COLOURS[c], dtype=torch.float32) / 255 for c in look.colours]
    offsets = _centre_offsets()
    margin = 1.0 / max(h, w)
    out = []
    for i in range(n):
        if area[i] < MIN_AREA:
            out.append(LookReading(0.0, 0.0, False, False, 0.0))
            continue
        r = radius[i]
        split = SPLITS.get(look.pattern)
        ox, oy = (0.0, 0.0) if split is None or split.at_centroid else offsets[shape_idx[i]]
        right_shape = look.shape is None or SHAPES[shape_idx[i]] == look.shape
        right_size = look.size is None or ("large" if r > SIZE_CUT else "small") == look.size
        if split is None:
            contrast, colour_match = 1.0, _plain_match(x[i], mask[i], rgb[0])
            score = colour_match
        else:
            grid = (xs.view(1, -1), ys.view(-1, 1))
            parts = split.parts(grid, cx[i] - ox * r, cy[i] - oy * r, r, margin)
            where = _interior(mask[i]).float() if split.interior else mask[i]
            contrast, colour_match = _two_colour_evidence(x[i], where, parts, rgb)
            score = min(1.0, contrast) * (0.5 + 0.5 * colour_match)
        score = score * (1.0 if right_shape else WRONG_SHAPE) * (1.0 if right_size else WRONG_SIZE)
        out.append(LookReading(contrast, colour_match, right_shape, right_size, score))
    return out


def _match(offset_squared: torch.Tensor) -> float:
    return float(torch.exp(-offset_squared / (2 * COLOUR_TOLERANCE ** 2)))


def _interior(mask: torch.Tensor) -> torch.Tensor:
    """The object's pixels whose four neighbours are object too (bool [H,W])."""
    solid = mask.bool()
    inner = solid.clone()
    inner[1:] &= solid[:-1]
    inner[:-1] &= solid[1:]
    inner[:, 1:] &= solid[:, :-1]
    inner[:, :-1] &= solid[:, 1:]
    return inner


def _plain_match(image: torch.Tensor, mask: torch.Tensor, rgb: torch.Tensor) -> float:
    """Colour match of the object's interior (unblended with the background), or of all of it when tiny."""
    inner = _interior(mask)
    pick = inner if inner.any() else mask.bool()
    mean = image[:, pick].mean(dim=1)
    return _match((mean - rgb).norm() ** 2)


def _two_colour_evidence(image: torch.Tensor, mask: torch.Tensor, parts: list[tuple[int, torch.Tensor]],
                         rgb: list[torch.Tensor]) -> tuple[float, float]:
    """(contrast, colour match): the distance between the two colours' mean part colours less the spread
    among parts of one colour, over the look's colour distance; and how near those means are the colours."""
    means: list[list[torch.Tensor]] = [[], []]
    for label, where in parts:
        wgt = mask * where
        if wgt.sum() > 0:  # parts the object does not reach (a band above a triangle) say nothing
            means[label].append((image * wgt).sum(dim=(1, 2)) / wgt.sum().clamp(min=1))
    if not means[0] or not means[1]:
        return 0.0, 0.0
    centre = [sum(m) / len(m) for m in means]
    spread = [_mean_pair_distance(m) for m in means]
    within = sum(spread) / 2
    span = float((rgb[0] - rgb[1]).norm())
    contrast = float(((centre[0] - centre[1]).norm() - within).clamp(min=0) / span)
    return contrast, _match((centre[0] - rgb[0]).norm() ** 2 + (centre[1] - rgb[1]).norm() ** 2)


def _mean_pair_distance(means: list[torch.Tensor]) -> torch.Tensor | float:
    pairs = [(a - b).norm() for k, a in enumerate(means) for b in means[k + 1:]]
    return sum(pairs) / len(pairs) if pairs else 0.0
