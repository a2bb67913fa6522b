"""Read a toy-world image back into attributes: background, object colour, shape, size and position.

Analytic, so it needs no training and works at any resolution: the background is the commonest palette
colour along the border; the object is every pixel far from it, weighted by how far (a soft coverage that
survives blur); position and size come from that coverage's centroid and area; the shape is the rendered
template (placed at the same centroid and area) that overlaps the coverage best.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sdtune.toyworld.world import COLOUR_NAMES, COLOURS, POSITION_NAMES, POSITIONS, SHAPES, SIZES, shape_coverage, \
    shape_mask

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "size", "position")
MIN_AREA = 0.004  # an "object" covering less of the image than this is treated as no object


@dataclass(frozen=True)
class Reading:
    """What the evaluator saw in one image (None where there is no object); extra fields are diagnostics."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    area: float = 0.0
    centroid: tuple[float, float] = (0.5, 0.5)
    shape_score: float = 0.0  # soft IoU of the best template

    def as_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ATTRIBUTES}


def as_float_batch(images) -> torch.Tensor:
    """Images (PIL list, HxWx3 uint8 arrays, or a [N,3,H,W] uint8/[0,1] float tensor) -> float [N,3,H,W]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def palette() -> torch.Tensor:
    """The palette as [K,3] floats in [0,1], in COLOUR_NAMES order."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0


def nearest_colour(rgb: torch.Tensor) -> torch.Tensor:
    """Index of the nearest palette colour for [...,3] colours."""
    return torch.cdist(rgb.reshape(-1, 3), palette()).argmin(dim=1).view(rgb.shape[:-1])


@functools.lru_cache(maxsize=None)
def shape_geometry() -> tuple[tuple[float, float, float], ...]:
    """(unit area, centroid x, centroid y) of every shape at radius 1, measured on a fine grid."""
    g = torch.linspace(-1.4, 1.4, 701)
    y, x = torch.meshgrid(g, g, indexing="ij")
    cell = float((g[1] - g[0]) ** 2)
    out = []
    for name in SHAPES:
        m = shape_mask(name, x, y).float()
        out.append((float(m.sum()) * cell, float((m * x).sum() / m.sum()), float((m * y).sum() / m.sum())))
    return tuple(out)


def background_and_coverage(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: background palette index [N], background colour [N,3], distance from it [N,H,W]."""
    n, _, h, w = x.shape
    ring = max(1, h // 16)
    border = torch.ones((h, w), dtype=torch.bool)
    border[ring:h - ring, ring:w - ring] = False
    pix = x.permute(0, 2, 3, 1)[:, border]  # [N,P,3]
    labels = nearest_colour(pix)
    bg_idx = torch.mode(labels, dim=1).values
    bg_rgb = torch.stack([pix[i][labels[i] == bg_idx[i]].median(dim=0).values for i in range(n)])
    dist = (x - bg_rgb.view(n, 3, 1, 1)).norm(dim=1)
    return bg_idx, bg_rgb, dist


def read_images(images, obj_threshold: float = 0.2) -> list[Reading]:
    """Evaluate every image; see the module docstring for the method."""
    x = as_float_batch(images)
    n, _, h, w = x.shape
    bg_idx, bg_rgb, dist = background_and_coverage(x)
    readings: list[Reading | None] = [None] * n
    cover = torch.zeros((n, h, w))
    obj_idx = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        far = dist[i] > obj_threshold
        if far.sum() < 2:
            continue
        deep = dist[i] >= 0.7 * torch.quantile(dist[i][far], 0.9)
        obj_rgb = x[i].permute(1, 2, 0)[deep].median(dim=0).values
        ref = max(float((obj_rgb - bg_rgb[i]).norm()), obj_threshold)
        cover[i] = (dist[i] / ref).clamp(0, 1) * (dist[i] > 0.5 * obj_threshold)
        obj_idx[i] = nearest_colour(obj_rgb)
    area = cover.sum(dim=(1, 2)) / (h * w)
    gy = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    gx = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    mass = cover.sum(dim=(1, 2)).clamp(min=1e-6)
    cx = (cover.sum(dim=1) * gx).sum(dim=1) / mass
    cy = (cover.sum(dim=2) * gy).sum(dim=1) / mass
    shape_idx, radius, score = match_shapes(cover, area, cx, cy)
    anchors = torch.tensor(list(POSITIONS.values()))
    pos_idx = torch.cdist(torch.stack([cx, cy], dim=1), anchors).argmin(dim=1)
    size_cut = float(np.sqrt(np.prod(list(SIZES.values()))))
    for i in range(n):
        bg = COLOUR_NAMES[bg_idx[i]]
        if area[i] < MIN_AREA:
            readings[i] = Reading(bg, None, None, None, None, float(area[i]), (float(cx[i]), float(cy[i])))
            continue
        readings[i] = Reading(
            bg, COLOUR_NAMES[obj_idx[i]], SHAPES[shape_idx[i]],
            "large" if radius[i] > size_cut else "small", POSITION_NAMES[pos_idx[i]], float(area[i]),
            (float(cx[i]), float(cy[i])), float(score[i]),
        )
    return readings  # type: ignore[return-value]


def match_shapes(cover: torch.Tensor, area: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                 blurs: tuple[int, ...] = (0, 3, 5)):
    """Best template per image: (shape index [N], radius [N], soft IoU [N]). Each template is also tried
    box-blurred (generated and VAE-decoded images are soft; blur rounds a square towards a circle)."""
    n, h, _ = cover.shape
    scores, radii = [], []
    for k, (unit_area, ox, oy) in enumerate(shape_geometry()):
        r = (area / unit_area).clamp(min=1e-4).sqrt()
        tmpl = shape_coverage(torch.full((n,), k), cx - ox * r, cy - oy * r, r, h, supersample=2)
        best = torch.zeros(n)
        for width in blurs:
            t = tmpl if width == 0 else torch.nn.functional.avg_pool2d(
                tmpl.unsqueeze(1), width, stride=1, padding=width // 2, count_include_pad=False).squeeze(1)
            inter = torch.minimum(t, cover).sum(dim=(1, 2))
            union = torch.maximum(t, cover).sum(dim=(1, 2)).clamp(min=1e-6)
            best = torch.maximum(best, inter / union)
        scores.append(best)
        radii.append(r)
    s, r = torch.stack(scores, dim=1), torch.stack(radii, dim=1)
    best = s.argmax(dim=1)
    return best, r.gather(1, best[:, None]).squeeze(1), s.gather(1, best[:, None]).squeeze(1)


def judge_images(images) -> list[dict[str, str | None]]:
    """An independent, cruder judge (hard palette labels, bounding boxes, nearest prototype) used to
    cross-check read_images on generated images, where no ground truth exists."""
    x = as_float_batch(images)
    n, _, h, w = x.shape
    labels = nearest_colour(x.permute(0, 2, 3, 1))  # [N,H,W]
    frame = torch.cat([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], dim=1)
    bg = torch.mode(frame, dim=1).values
    protos = _bbox_prototypes()
    out = []
    for i in range(n):
        mask = labels[i] != bg[i]
        if mask.sum() < MIN_AREA * h * w:
            out.append({"background": COLOUR_NAMES[bg[i]], "colour": None, "shape": None, "size": None,
                        "position": None})
            continue
        inner = mask.clone()  # pixels whose four neighbours are object too: no blended edge colours
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        colour = torch.mode(labels[i][inner if inner.any() else mask]).values
        mask = labels[i] == colour if (labels[i] == colour).sum() >= MIN_AREA * h * w else mask
        ys, xs = mask.nonzero(as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        crop = mask[y0:y1, x0:x1].float()[None, None]
        crop = torch.nn.functional.interpolate(crop, size=(12, 12), mode="area").flatten()
        shape = int(((protos - crop) ** 2).sum(dim=1).argmin())
        mx, my = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        pos = "center" if abs(mx - 0.5) < 0.1 and abs(my - 0.5) < 0.1 else \
            f"{'top' if my < 0.5 else 'bottom'} {'left' if mx < 0.5 else 'right'}"
        radius = (float(mask.sum()) / (h * w) / shape_geometry()[shape][0]) ** 0.5
        size = "large" if radius > float(np.sqrt(np.prod(list(SIZES.values())))) else "small"
        out.append({"background": COLOUR_NAMES[bg[i]], "colour": COLOUR_NAMES[colour], "shape": SHAPES[shape],
                    "size": size, "position": pos})
    return out


@functools.lru_cache(maxsize=None)
def _bbox_prototypes() -> torch.Tensor:
    """Each shape's mask cropped to its bounding box and resampled to 12x12, [K,144]."""
    g = torch.linspace(-1.3, 1.3, 261)
    y, x = torch.meshgrid(g, g, indexing="ij")
    rows = []
    for name in SHAPES:
        m = shape_mask(name, x, y)
        ys, xs = m.nonzero(as_tuple=True)
        crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].float()[None, None]
        rows.append(torch.nn.functional.interpolate(crop, size=(12, 12), mode="area").flatten())
    return torch.stack(rows)


def attribute_accuracy(readings: list[dict[str, str | None]], truths: list[dict[str, str | None]]) -> dict[str, float]:
    """Share of images where each attribute read equals the truth (attributes the truth leaves None skipped)."""
    acc = {}
    for key in ATTRIBUTES:
        pairs = [(r[key], t[key]) for r, t in zip(readings, truths) if t.get(key) is not None]
        if pairs:
            acc[key] = sum(a == b for a, b in pairs) / len(pairs)
    return acc
