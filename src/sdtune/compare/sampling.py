"""Evaluation images: every row draws the same noise for the same (seed, prompt, image), so rows differ only
by what they learned, and any batch split gives the same pictures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data import generator_for

BATCH = 24  # images per pipeline call


def fill(templates: list[str] | tuple[str, ...], token: str, class_word: str) -> list[str]:
    """Prompt templates with {token} and {class_word} filled in."""
    return [t.replace("{token}", token).replace("{class_word}", class_word) for t in templates]


@torch.no_grad()
def sample(model, prompts: list[str], per_prompt: int, seed: int, steps: int, guidance: float,
           on_batch: Callable[[int], None] | None = None,
           only: list[int] | tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W,3], prompt index [N]) with `per_prompt` images of each prompt, or of the prompts
    whose indices `only` lists (each drawn exactly as when all are sampled)."""
    pipe = model.pipeline()
    for module in model.components().values():
        module.eval()
    jobs = [(j, i) for j in (range(len(prompts)) if only is None else only) for i in range(per_prompt)]
    dtype, device = model.unet.dtype, model.unet.device
    out = []
    for start in range(0, len(jobs), BATCH):
        chunk = jobs[start: start + BATCH]
        generators = [generator_for(seed, j, i) for j, i in chunk]
        # Frozen weights may be half precision while trained ones are fp32: autocast bridges them.
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = pipe([prompts[j] for j, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generators, height=model.resolution, width=model.resolution,
                          output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if on_batch:
            on_batch(len(chunk))
    return np.concatenate(out), np.array([j for j, _ in jobs], dtype=np.int64)


def save_samples(path: Path, subject: tuple[np.ndarray, np.ndarray], class_: tuple[np.ndarray, np.ndarray]) -> Path:
    """One evaluation point's images, atomically, as a compressed .npz."""
    from ..artifacts import atomic_write_via

    return atomic_write_via(path, lambda tmp: np.savez_compressed(
        tmp, subject=subject[0], subject_prompt=subject[1], class_images=class_[0], class_prompt=class_[1]))


def load_samples(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
