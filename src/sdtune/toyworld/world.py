"""The toy world: coloured shapes on coloured backgrounds, rendered deterministically and vectorised.

Every scene is a handful of integer attributes plus small continuous jitter. Batches of scenes are rendered
with torch on any device (supersampled inside/outside tests, box-filtered), so the same code serves a single
test image on the CPU and hundreds of thousands of training images on a GPU in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (35, 165, 65),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 35),
    "orange": (245, 130, 25),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: dict[str, float] = {"small": 0.16, "large": 0.24}  # object radius as a fraction of the image side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {  # anchor (x, y) of the object's area centroid, y downwards
    "center": (0.5, 0.5),
    "top left": (0.29, 0.29),
    "top right": (0.71, 0.29),
    "bottom left": (0.29, 0.71),
    "bottom right": (0.71, 0.71),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
# Two-colour patterns: where `colour2` replaces `colour` inside the shape. Captions never name them; the VAE
# sees them so that it can encode and decode objects of more than one colour (like the builtin subject).
PATTERNS: tuple[str, ...] = ("plain", "quadrants", "halves", "stripes", "ring")
STRIPE_HEIGHT, STRIPE_TOP = 0.5, -1.5  # horizontal bands half a radius high counted from 1.5 radii above
RING_RADIUS_SQUARED = 0.3  # the disc of colour2 in the middle of a "ring" (its radius squared, in radii)

POS_JITTER = 0.02
SCALE_JITTER = 0.08
COLOUR_JITTER = 0.03


@dataclass(frozen=True)
class Scene:
    """One image's content: names from the tables above plus jitter (offsets in image fractions)."""

    shape: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    pattern: str = "plain"
    colour2: str | None = None
    tint: tuple[float, float] = (0.0, 0.0)  # brightness offsets of object and background


@dataclass
class SceneBatch:
    """Column form of many scenes (numpy arrays), the form the vectorised renderer reads."""

    shape: np.ndarray
    colour: np.ndarray
    background: np.ndarray
    size: np.ndarray
    position: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    pattern: np.ndarray
    colour2: np.ndarray
    tint_obj: np.ndarray
    tint_bg: np.ndarray

    def __len__(self) -> int:
        return len(self.shape)

    def scene(self, i: int) -> Scene:
        """Return row i as a Scene."""
        c2 = int(self.colour2[i])
        return Scene(
            SHAPES[self.shape[i]], COLOUR_NAMES[self.colour[i]], COLOUR_NAMES[self.background[i]],
            SIZE_NAMES[self.size[i]], POSITION_NAMES[self.position[i]], float(self.dx[i]), float(self.dy[i]),
            float(self.scale[i]), PATTERNS[self.pattern[i]], COLOUR_NAMES[c2] if c2 >= 0 else None,
            (float(self.tint_obj[i]), float(self.tint_bg[i])),
        )

    def subset(self, idx: np.ndarray | slice) -> "SceneBatch":
        """Rows `idx` as a new batch."""
        return SceneBatch(**{k: v[idx] for k, v in vars(self).items()})


def scenes_to_batch(scenes: list[Scene]) -> SceneBatch:
    """Pack Scene objects into column form."""
    col = lambda f: np.array([f(s) for s in scenes])  # noqa: E731
    return SceneBatch(
        shape=col(lambda s: SHAPES.index(s.shape)),
        colour=col(lambda s: COLOUR_NAMES.index(s.colour)),
        background=col(lambda s: COLOUR_NAMES.index(s.background)),
        size=col(lambda s: SIZE_NAMES.index(s.size)),
        position=col(lambda s: POSITION_NAMES.index(s.position)),
        dx=col(lambda s: s.dx).astype(np.float32),
        dy=col(lambda s: s.dy).astype(np.float32),
        scale=col(lambda s: s.scale).astype(np.float32),
        pattern=col(lambda s: PATTERNS.index(s.pattern)),
        colour2=col(lambda s: COLOUR_NAMES.index(s.colour2) if s.colour2 else -1),
        tint_obj=col(lambda s: s.tint[0]).astype(np.float32),
        tint_bg=col(lambda s: s.tint[1]).astype(np.float32),
    )


HELD_OUT_COUNT = 24  # of the 336 (shape, colour, background) combinations; pretraining may leave them out


def held_out_combinations() -> frozenset[tuple[int, int, int]]:
    """A fixed set of (shape, colour, background) index triples for measuring generalisation: a
    pretraining run with `hold_out_combinations` never shows them, and the check can prompt only them."""
    rng = np.random.default_rng(20261126)
    triples = [(s, c, b) for s in range(len(SHAPES)) for c in range(len(COLOURS))
               for b in range(len(COLOURS)) if b != c]
    picked = rng.choice(len(triples), HELD_OUT_COUNT, replace=False)
    return frozenset(triples[i] for i in picked)


def sample_scenes(n: int, seed: int, jitter: bool = True, held_out: str = "any") -> SceneBatch:
    """Draw n plain scenes uniformly (object colour never equals the background) from a seeded generator.
    held_out: "any" (every combination), "exclude" (never a held_out_combinations() triple) or "only"."""
    if held_out not in ("any", "exclude", "only"):
        raise ValueError(f"held_out must be any, exclude or only, not {held_out!r}")
    rng = np.random.default_rng(seed)
    shape, colour, background = _draw_objects(rng, n)
    if held_out != "any":
        shape, colour, background = _constrain(rng, shape, colour, background, held_out == "only")
    amp = 1.0 if jitter else 0.0
    return SceneBatch(
        shape=shape,
        colour=colour,
        background=background,
        size=rng.integers(0, len(SIZES), n),
        position=rng.integers(0, len(POSITIONS), n),
        dx=(amp * rng.uniform(-POS_JITTER, POS_JITTER, n)).astype(np.float32),
        dy=(amp * rng.uniform(-POS_JITTER, POS_JITTER, n)).astype(np.float32),
        scale=(1 + amp * rng.uniform(-SCALE_JITTER, SCALE_JITTER, n)).astype(np.float32),
        pattern=np.zeros(n, dtype=np.int64),
        colour2=np.full(n, -1),
        tint_obj=(amp * rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, n)).astype(np.float32),
        tint_bg=(amp * rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, n)).astype(np.float32),
    )


def _draw_objects(rng, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shape, colour, background) of n scenes, the background never the object's colour. The draw order
    (colour, background, shape) is the one every seeded scene set so far was made with."""
    colour = rng.integers(0, len(COLOURS), n)
    background = (colour + rng.integers(1, len(COLOURS), n)) % len(COLOURS)
    return rng.integers(0, len(SHAPES), n), colour, background


def _constrain(rng, shape, colour, background, only: bool):
    """Draw the (shape, colour, background) of every scene from the held-out set (only), or redraw those
    that fall in it until none does (exclude)."""
    table = np.array(sorted(held_out_combinations()))
    if only:
        pick = table[rng.integers(0, len(table), len(shape))]
        return pick[:, 0], pick[:, 1], pick[:, 2]
    is_held = np.zeros((len(SHAPES), len(COLOURS), len(COLOURS)), dtype=bool)
    is_held[tuple(table.T)] = True
    shape, colour, background = shape.copy(), colour.copy(), background.copy()
    while (bad := is_held[shape, colour, background]).any():
        shape[bad], colour[bad], background[bad] = _draw_objects(rng, int(bad.sum()))
    return shape, colour, background


def sample_patterned_scenes(n: int, seed: int) -> SceneBatch:
    """Like sample_scenes, but every object is two-coloured in one of the PATTERNS (for the VAE only)."""
    rng = np.random.default_rng(seed)
    b = sample_scenes(n, seed=int(rng.integers(2**31)))
    b.pattern = rng.integers(1, len(PATTERNS), n)
    others = [c for c in range(len(COLOURS))]
    b.colour2 = np.array([rng.choice([c for c in others if c not in (a, g)]) for a, g in zip(b.colour, b.background)])
    return b


def shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inside test in unit coordinates (radius ~1, y downwards, area centroid near the origin)."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (x.abs() <= 0.84) & (y.abs() <= 0.84)
    if shape == "triangle":  # equilateral, apex up, centroid at the origin
        r_in = 0.58
        inside = y <= r_in
        for ang in (math.radians(210), math.radians(330)):
            inside &= x * math.cos(ang) + y * math.sin(ang) <= r_in
        return inside
    if shape == "star":  # five points, one straight up
        outer, inner = 1.05, 0.45
        theta = torch.atan2(y, x) + math.pi / 2
        sector = 2 * math.pi / 5
        a = torch.remainder(theta, sector)
        a = torch.minimum(a, sector - a)
        rho = torch.sqrt(x * x + y * y)
        qx, qy = rho * torch.cos(a), rho * torch.sin(a)
        bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
        return (bx - outer) * qy - by * (qx - outer) >= 0
    if shape == "heart":  # (u^2 + v^2 - 1)^3 <= u^2 v^3 with v upwards, scaled to radius ~1
        u, v = x * 1.12, -y * 1.12 + 0.12
        return (u * u + v * v - 1) ** 3 <= u * u * v ** 3
    if shape == "cross":  # a plus sign
        arm = 0.34
        return ((x.abs() <= arm) & (y.abs() <= 0.95)) | ((x.abs() <= 0.95) & (y.abs() <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern_idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Where each image's second colour goes, in unit coordinates [N,H,W] (all False for "plain")."""
    p = pattern_idx.view(-1, 1, 1)
    quadrants = (x < 0) ^ (y < 0)  # colour on the top-left and bottom-right quarters
    halves = x >= 0  # colour on the left half
    stripes = torch.remainder(torch.floor((y - STRIPE_TOP) / STRIPE_HEIGHT), 2) == 1  # odd bands: colour2
    ring = x * x + y * y <= RING_RADIUS_SQUARED  # colour2 in the middle, colour around it
    return ((p == 1) & quadrants) | ((p == 2) & halves) | ((p == 3) & stripes) | ((p == 4) & ring)


def _palette(device: torch.device) -> torch.Tensor:
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 255.0


def shape_inside(
    shape_idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int, supersample: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Supersampled inside masks [N, size*ss, size*ss] for shapes centred at (cx, cy) with radius r
    (image fractions, tensors [N]), plus the unit coordinates x, y of every sample."""
    n, side, device = shape_idx.shape[0], size * supersample, shape_idx.device
    grid = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    x = ((grid.view(1, 1, -1) - cx.view(n, 1, 1)) / r.view(n, 1, 1)).expand(n, side, side)
    y = ((grid.view(1, -1, 1) - cy.view(n, 1, 1)) / r.view(n, 1, 1)).expand(n, side, side)
    inside = torch.zeros((n, side, side), dtype=torch.bool, device=device)
    for k, name in enumerate(SHAPES):
        sel = (shape_idx == k).nonzero().flatten()
        if len(sel):
            inside[sel] = shape_mask(name, x[sel], y[sel])
    return inside, x, y


def shape_coverage(
    shape_idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int, supersample: int = 4,
) -> torch.Tensor:
    """Fraction of each pixel covered by the shape, [N, size, size] floats (antialiased masks)."""
    inside, _, _ = shape_inside(shape_idx, cx, cy, r, size, supersample)
    return torch.nn.functional.avg_pool2d(inside.float().unsqueeze(1), supersample).squeeze(1)


def render_batch(
    batch: SceneBatch, size: int = 32, device: str | torch.device = "cpu", supersample: int = 4,
    chunk: int = 1024,
) -> torch.Tensor:
    """Render scenes to a uint8 tensor [N, 3, size, size] on `device` (deterministic for a given device)."""
    device = torch.device(device)
    n, ss = len(batch), supersample
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    pal = _palette(device)
    anchors = torch.tensor(list(POSITIONS.values()), dtype=torch.float32, device=device)
    radii = torch.tensor(list(SIZES.values()), dtype=torch.float32, device=device)
    t = lambda a, dt=torch.float32: torch.as_tensor(np.asarray(a), device=device).to(dt)  # noqa: E731
    for start in range(0, n, chunk):
        part = batch.subset(slice(start, start + chunk))
        m = len(part)
        pos = t(part.position, torch.long)
        r = radii[t(part.size, torch.long)] * t(part.scale)
        cx, cy = anchors[pos, 0] + t(part.dx), anchors[pos, 1] + t(part.dy)
        inside, x, y = shape_inside(t(part.shape, torch.long), cx, cy, r, size, ss)
        c1 = (pal[t(part.colour, torch.long)] + t(part.tint_obj)[:, None]).view(m, 3, 1, 1)
        c2_idx = t(part.colour2, torch.long)
        c2 = (pal[c2_idx.clamp(min=0)] + t(part.tint_obj)[:, None]).view(m, 3, 1, 1)
        bg = (pal[t(part.background, torch.long)] + t(part.tint_bg)[:, None]).view(m, 3, 1, 1)
        second = pattern_mask(t(part.pattern, torch.long), x, y) & (c2_idx >= 0).view(m, 1, 1)
        obj = torch.where(second.unsqueeze(1), c2, c1)
        img = torch.where(inside.unsqueeze(1), obj, bg.expand(m, 3, 1, 1))
        img = torch.nn.functional.avg_pool2d(img, ss) if ss > 1 else img
        out[start:start + m] = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return out


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render one scene as an HxWx3 uint8 array (on the CPU)."""
    return render_batch(scenes_to_batch([scene]), size)[0].permute(1, 2, 0).numpy()


def to_pil(image: np.ndarray | torch.Tensor):
    """A PIL image from an HxWx3 array or a 3xHxW uint8 tensor."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy() if image.shape[0] == 3 else image.cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8))
