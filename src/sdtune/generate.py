"""Generation: model + artifacts named in an A1111-style prompt -> images, with diffusers' defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SdtuneError

# Scheduler names users type, mapped to diffusers classes (and options) built from the model's config.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass
class GenerateOptions:
    """diffusers' pipeline defaults unless the user says otherwise."""

    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    count: int = 1
    scheduler: str = ""
    width: int = 0
    height: int = 0
    artifact_dirs: list[Path] = field(default_factory=list)


def make_scheduler(model, name: str):
    import diffusers

    if not name:
        return model.scheduler
    if name not in SCHEDULERS:
        raise SdtuneError(f"Unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}.")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config({**model.scheduler.config, **extra})


def apply_prompt_artifacts(model, prompt: str, artifact_dirs: list[Path]) -> str:
    """Apply every <lora:...>/<hypernet:...> named in the prompt; return the prompt without the tags."""
    from .artifacts import load_artifact
    from .methods import get
    from .prompt import parse_artifact_tags, resolve_artifact

    text, tags = parse_artifact_tags(prompt)
    for tag in tags:
        path = resolve_artifact(tag, artifact_dirs)
        tensors, metadata = load_artifact(path)
        method = get(tag.kind if tag.kind != "hypernet" else "hypernetwork")()
        state = method.decode_file(model, tensors, metadata, path) if hasattr(method, "decode_file") else tensors
        method.apply(model, state, tag.weight, name=tag.name)
    return text


@torch.no_grad()
def generate(model, prompt: str, options: GenerateOptions) -> list:
    """Images (PIL) for `prompt`; the same seed gives the same images as a plain diffusers pipeline."""
    text = apply_prompt_artifacts(model, prompt, options.artifact_dirs)
    pipe = model.pipeline(make_scheduler(model, options.scheduler))
    pipe.set_progress_bar_config(disable=True)
    size = {"width": options.width or None, "height": options.height or None}
    result = pipe(text, negative_prompt=options.negative_prompt or None, num_inference_steps=options.steps,
                  guidance_scale=options.guidance, num_images_per_prompt=options.count,
                  generator=torch.Generator().manual_seed(options.seed), **size)
    return result.images


def save_images(images: list, path: str | Path) -> list[Path]:
    """One image at PATH; several at PATH's stem + -0, -1, ... and a grid of them at PATH."""
    from .artifacts import atomic_write_via

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if len(images) > 1:
        for i, image in enumerate(images):
            target = path.with_name(f"{path.stem}-{i}{path.suffix}")
            atomic_write_via(target, image.save)
            written.append(target)
        grid = image_grid(images)
        atomic_write_via(path, grid.save)
    else:
        atomic_write_via(path, images[0].save)
    return [path] + written


def image_grid(images: list, columns: int | None = None):
    """Images side by side in a near-square grid."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
