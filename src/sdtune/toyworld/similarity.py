"""Subject similarity without a download, for a subject of one's own on the builtin model: how much a generated
image's object looks like the object in any of the subject's reference images (0..1), knowing nothing else
about the subject.

Toy-world images show one object on a plain background, so the object can be cut out as every pixel far from
the background colour (as the evaluators do). Each object is resampled onto a grid centred on its centroid and
scaled by the square root of its area, so position and size drop out; what is left is its outline and the
colours inside it (pattern, colour, shape). Two objects compare by the overlap of their outlines (soft IoU),
times how close their colours are where both have inner pixels (exp(-rms^2 / 2 tol^2), at the best of shifts by
a grid cell), times how close their sizes are (unless the prompt asked for a size); an image scores its best
reference.

Measured on the builtin subjects (whose exact scorers know their looks), the similarity orders partly learned
subjects as those scorers do: scripts/similarity_check.py prints the Spearman correlation for a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdtune.toyworld.evaluate import MIN_AREA, as_float_batch, background_and_coverage

DESCRIPTION = ("object similarity to your images (offline, 0..1): each image's object, cut out from its plain "
               "background, centred and scaled to its area, against each of your images' objects, outline overlap "
               "times colour closeness inside it (at the best of small shifts) times size match, the best match "
               "counting")
GRID = 16  # samples per side of the normalised object grid
EXTENT = 0.75  # the grid spans +-EXTENT square roots of the object's area around its centroid (a circle: +-1.3 r)
OBJECT_DISTANCE = 0.2  # RGB distance from the background (0..1 per channel) beyond which a pixel is object
COLOUR_TOLERANCE = 0.25  # rms RGB distance at which the colour closeness falls to exp(-1/2)
# log size ratio at which the size factor falls to exp(-1/2): the world's two sizes (radii 1.5 apart, measured
# ~1.4) give ~0.4, the factor the exact scorers give a look of the wrong size
SIZE_TOLERANCE = 0.25
# Colours compare at the best of these grid shifts (in cells, both axes): a centroid a pixel off, as a deformed
# outline puts it, would otherwise misalign every stripe or quarter.
SHIFTS = (-1, 0, 1)
THRESHOLD = 0.5  # a similarity at or above it counts as showing the subject


@dataclass(frozen=True)
class Objects:
    """Objects of a batch of images on the normalised grid: colours [N,3,G,G] of the inner pixels, outline and
    inner pixels [N,G,G] (soft), size (square root of the area, in image sides) and whether the image has an
    object at all [N]."""

    colours: torch.Tensor
    outline: torch.Tensor
    inside: torch.Tensor
    scale: torch.Tensor
    present: torch.Tensor


def cut_out(images) -> Objects:
    """Each image's object resampled onto the normalised grid (see the module docstring)."""
    x = as_float_batch(images)
    n, _, h, w = x.shape
    _, _, dist = background_and_coverage(x)
    mask = (dist > OBJECT_DISTANCE).float()
    area = mask.mean(dim=(1, 2))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    mass = mask.sum(dim=(1, 2)).clamp(min=1)
    cx = (mask.sum(dim=1) * xs).sum(dim=1) / mass
    cy = (mask.sum(dim=2) * ys).sum(dim=1) / mass
    half = EXTENT * area.clamp(min=MIN_AREA).sqrt()
    steps = torch.linspace(-1, 1, GRID)
    # grid_sample's coordinates run from -1 (first pixel's outer edge) to 1 (last pixel's) over the image.
    gx = (cx.view(n, 1, 1) + half.view(n, 1, 1) * steps.view(1, 1, GRID)) * 2 - 1
    gy = (cy.view(n, 1, 1) + half.view(n, 1, 1) * steps.view(1, GRID, 1)) * 2 - 1
    grid = torch.stack([gx.expand(n, GRID, GRID), gy.expand(n, GRID, GRID)], dim=-1)
    sample = lambda t: torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="zeros",  # noqa: E731
                                                        align_corners=False)
    outline = sample(mask.unsqueeze(1)).squeeze(1)
    # Colours from the interior only: edge pixels blend the object with its background, which differs between
    # an image and its references.
    inner = interior(mask).unsqueeze(1)
    weight = sample(inner).squeeze(1)
    colours = sample(x * inner) / weight.unsqueeze(1).clamp(min=1e-3)
    return Objects(colours, outline, weight, area.sqrt(), area >= MIN_AREA)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of the masks [N,H,W] whose four neighbours are object too (float)."""
    inner = mask.clone()
    inner[:, 1:] *= mask[:, :-1]
    inner[:, :-1] *= mask[:, 1:]
    inner[:, :, 1:] *= mask[:, :, :-1]
    inner[:, :, :-1] *= mask[:, :, 1:]
    return inner


def pairwise(found: Objects, references: Objects, size_free: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity of every found object to every reference object, [N, R] in 0..1; a size unlike the
    reference's counts against it except where `size_free` [N] (the prompt asked for a size of its own)."""
    inter = torch.minimum(found.outline[:, None], references.outline[None])  # [N,R,G,G]
    union = torch.maximum(found.outline[:, None], references.outline[None])
    overlap = inter.sum(dim=(2, 3)) / union.sum(dim=(2, 3)).clamp(min=1e-6)
    rms = torch.stack([_colour_rms(_shifted(found.colours, dy, dx), _shifted(found.inside, dy, dx), references)
                       for dy in SHIFTS for dx in SHIFTS]).min(dim=0).values
    closeness = torch.exp(-rms ** 2 / (2 * COLOUR_TOLERANCE ** 2))
    ratio = torch.log(found.scale[:, None].clamp(min=1e-3) / references.scale[None].clamp(min=1e-3))
    sized = torch.exp(-ratio ** 2 / (2 * SIZE_TOLERANCE ** 2))
    if size_free is not None:
        sized = torch.where(size_free[:, None], torch.ones(()), sized)
    both = found.present[:, None] & references.present[None]
    return torch.where(both, overlap * closeness * sized, torch.zeros(()))


def _colour_rms(colours: torch.Tensor, inside: torch.Tensor, references: Objects) -> torch.Tensor:
    """RMS colour distance [N,R] over the grid points inside both objects."""
    squared = ((colours[:, None] - references.colours[None]) ** 2).sum(dim=2)  # [N,R,G,G]
    both_inside = inside[:, None] * references.inside[None]
    return ((both_inside * squared).sum(dim=(2, 3)) / both_inside.sum(dim=(2, 3)).clamp(min=1e-6)).sqrt()


def _shifted(grid: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The grid [..., G, G] moved by (dy, dx) cells, zeros where it moved in from outside."""
    out = torch.zeros_like(grid)
    h, w = grid.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        grid[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def similarity(images, references, size_free=None) -> np.ndarray:
    """Per image, its object's similarity to the nearest reference object (0 without an object); `size_free`
    marks the images whose prompt asked for a size, where size does not count."""
    if len(images) == 0:
        return np.zeros(0)
    refs = cut_out(references)
    if not bool(refs.present.any()):
        raise ValueError("none of the reference images shows an object on a plain background")
    found = cut_out(images)
    free = None if size_free is None else torch.as_tensor(np.asarray(size_free, dtype=bool))
    return pairwise(found, refs, free).max(dim=1).values.numpy().astype(np.float64)
