"""Generation: model + artifacts named in an A1111-style prompt -> images, with diffusers' defaults."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GENERATE_STEPS
from .errors import SdtuneError
from .prompt_embeds import pipeline_prompt_kwargs

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
    steps: int = GENERATE_STEPS
    guidance: float | None = None  # None: the pipeline's own default (7.5 for SD1/SD2, 5.0 for SDXL)
    seed: int = 0
    count: int = 1
    scheduler: str = ""
    width: int = 0
    height: int = 0
    artifact_dirs: list[Path] = field(default_factory=list)
    clip_skip: int = 1  # A1111 meaning: 1 = the last layer, 2 = the penultimate, ...


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


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def activate_embeddings(model, texts: list[str], artifact_dirs: list[Path]) -> list[str]:
    """Load every Textual Inversion embedding whose name is written as a word in `texts` (earlier folders and
    shallower files win); return the texts with those names spelled as registered, which lets the pipeline
    expand a multi-vector name to all its vectors (tok -> "tok tok_1 tok_2", as diffusers does)."""
    from .artifacts import load_artifact
    from .formats.embeddings import detect, file_names
    from .methods import get

    method, active = get("textual-inversion")(), set()
    for path in _artifact_files(artifact_dirs, EMBEDDING_SUFFIXES):
        name = next((n for n in file_names(path) if n.lower() not in active and _word_in(n, texts)), None)
        if name is None:
            continue
        obj, metadata = load_artifact(path)
        if detect(obj) is None:
            continue  # e.g. a hypernetwork .pt whose stem is also a word of the prompt
        method.apply(model, method.decode_file(model, obj, metadata, path), name=name)
        active.add(name.lower())
    for name in active:
        texts = [_word_pattern(name).sub(lambda _, n=name: n, t) for t in texts]
    return texts


def _word_pattern(name: str) -> re.Pattern:
    """`name` as a whole word, any case (CLIP's tokenizer lower-cases prompts)."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def _word_in(name: str, texts: list[str]) -> bool:
    return any(_word_pattern(name).search(t) for t in texts)


def _artifact_files(folders: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files with `suffixes` under each folder in order, shallowest first within a folder."""
    from .prompt import artifact_candidates

    found: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_dir():
            found += artifact_candidates(folder, suffixes)
    return list(dict.fromkeys(found))


@torch.no_grad()
def generate(model, prompt: str, options: GenerateOptions) -> list:
    """Images (PIL) for `prompt`; the same seed gives the same images as a plain diffusers pipeline."""
    text = apply_prompt_artifacts(model, prompt, options.artifact_dirs)
    text, negative = activate_embeddings(model, [text, options.negative_prompt], options.artifact_dirs)
    pipe = model.pipeline(make_scheduler(model, options.scheduler))
    pipe.set_progress_bar_config(disable=True)
    extra = {"width": options.width or None, "height": options.height or None}
    if options.guidance is not None:
        extra["guidance_scale"] = options.guidance
    prompt_kwargs = pipeline_prompt_kwargs(model, text, negative, options.clip_skip)
    with torch.inference_mode():  # ~10% faster than no_grad on a CPU; only the sampling, so artifacts
        # applied above stay ordinary tensors for a later training in the same process (the web UI)
        result = pipe(**prompt_kwargs, num_inference_steps=options.steps, num_images_per_prompt=options.count,
                      generator=torch.Generator().manual_seed(options.seed), **extra)
    return result.images


def check_image_path(path: str | Path, count: int = 1) -> Path:
    """Refuse, before any work, an output path whose extension names no image format PIL writes, or whose
    images (PATH, and PATH-0 ... with several) would land on a folder, a device or a pipe."""
    from PIL import Image

    from .artifacts import refuse_special

    path = Path(path)
    if path.suffix.lower() not in Image.registered_extensions():
        raise SdtuneError(f"--output {path} does not end in an image extension; name it e.g. {path.stem or 'out'}.png.")
    for target in image_paths(path, count):
        refuse_special(target)
    return path


def image_paths(path: str | Path, count: int) -> list[Path]:
    """Where `count` images go: PATH alone, or a grid at PATH and the images at PATH's stem + -0, -1, ..."""
    path = Path(path)
    return [path] + ([path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)] if count > 1 else [])


def save_images(images: list, path: str | Path) -> list[Path]:
    """One image at PATH; several at PATH's stem + -0, -1, ... and a grid of them at PATH, all or none."""
    from .artifacts import atomic_write_many

    targets = image_paths(path, len(images))
    pictures = [image_grid(images), *images] if len(images) > 1 else images
    return atomic_write_many([(target, picture.save) for target, picture in zip(targets, pictures)])


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
