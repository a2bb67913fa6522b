"""Class (prior-preservation) images: the user's own, topped up with images the base model generates.

Generated images are cached in the class folder with a manifest recording each one's prompt, seed and the
base model's fingerprint, so a later run with the same base model and prompt reuses them, and a run with
another base model or prompt generates its own (the others stay on disk for when they fit again).

A base model may declare several class prompts (the builtin model does: a class object in many colours on
many backgrounds); generated image `seed` then uses prompt `seed mod count`, and each image is trained with
the prompt it was made from, so the prior loss keeps every one of those prompts meaning the plain class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import IMAGE_EXTENSIONS, ImageRecord, load_image, read_caption
from .errors import SdtuneError
from .scan import regular_files

MANIFEST = "sdtune-class-images.json"
DEFAULT_CLASS_PROMPT = "a photo of a {class_word}"
GUIDANCE = 7.5  # diffusers' pipeline default, as DreamBooth's reference script uses
BATCH = 4


@dataclass(frozen=True)
class Generated:
    """One manifest entry."""

    file: str
    prompt: str
    seed: int
    base_hash: str


def class_prompt(model, data_cfg) -> str:
    """The one prompt naming just the class, in words the base model knows: --class-prompt, the model's own
    template, or SD's. Class images of the user's without a .txt caption train with it."""
    if data_cfg.class_prompt:
        return data_cfg.class_prompt
    return model.extras.get("class_prompt_template", DEFAULT_CLASS_PROMPT).replace("{class_word}", data_cfg.class_word)


def class_prompts(model, data_cfg) -> list[str]:
    """Every prompt class images are generated and trained with: --class-prompt alone when given, else the
    model's own list (the builtin model's has many), else the one class prompt."""
    templates = None if data_cfg.class_prompt else model.extras.get("class_prompt_templates")
    if not templates:
        return [class_prompt(model, data_cfg)]
    return [t.replace("{class_word}", data_cfg.class_word) for t in templates]


def prepare(model, data_cfg, default_folder: Path, progress: bool = True) -> list[ImageRecord]:
    """The class images to train with: the folder's own images, then cached or newly generated ones from
    this base model, `num_class_images` in all."""
    if not data_cfg.class_word and not data_cfg.class_prompt:
        raise SdtuneError("Prior preservation needs --class-word (or --class-prompt) to know the class.")
    folder = Path(data_cfg.class_images or default_folder)
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"Class image folder {folder} is a file; pass a folder with --class-images.")
    folder.mkdir(parents=True, exist_ok=True)
    wanted, prompts, base = data_cfg.num_class_images, class_prompts(model, data_cfg), model.fingerprint()
    manifest = _read_manifest(folder)
    generated_files = {entry.file for entry in manifest}
    generic = class_prompt(model, data_cfg)
    own = [(p, read_caption(p) or generic) for p in _image_files(folder) if p.name not in generated_files]
    fitting = [e for e in manifest if e.prompt == _prompt_for(e.seed, prompts) and e.base_hash == base
               and (folder / e.file).is_file()]
    missing = wanted - len(own) - len(fitting)
    if missing > 0:
        used = {e.seed for e in fitting}
        seeds = [s for s in range(wanted + len(used)) if s not in used][:missing]
        resolution = data_cfg.resolution or model.resolution
        fitting += _generate(model, folder, prompts, seeds, base, manifest, resolution,
                             data_cfg.class_image_steps, progress)
    chosen = (own + [(folder / e.file, e.prompt) for e in sorted(fitting, key=lambda e: e.seed)])[:wanted]
    # Validated; each record's caption is the prompt it is trained with.
    return [ImageRecord(path, *load_image(path).size, caption=prompt) for path, prompt in chosen]


def _prompt_for(seed: int, prompts: list[str]) -> str:
    return prompts[seed % len(prompts)]


def _image_files(folder: Path) -> list[Path]:
    return regular_files(folder, IMAGE_EXTENSIONS, recursive=False)


def _read_manifest(folder: Path) -> list[Generated]:
    path = folder / MANIFEST
    if not path.is_file():
        return []
    try:
        return [Generated(**entry) for entry in json.loads(path.read_text(encoding="utf-8"))["images"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SdtuneError(f"The class image manifest {path} is damaged ({exc}); delete it to start afresh.") from exc


def _write_manifest(folder: Path, entries: list[Generated]) -> None:
    """Atomic replace, so an interrupted run keeps every image it finished."""
    from .artifacts import atomic_write_via

    text = json.dumps({"images": [e.__dict__ for e in entries]}, indent=1)
    atomic_write_via(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@torch.no_grad()
def _generate(model, folder: Path, prompts: list[str], seeds: list[int], base: str, manifest: list[Generated],
              resolution: int, steps: int, progress: bool) -> list[Generated]:
    """Generate one image per seed (batched) with the seed's prompt, saving each with its manifest entry as
    it is done."""
    from .artifacts import atomic_write_via
    from .progress import bar as progress_bar

    pipe = model.pipeline()
    device, dtype = model.unet.device, model.unet.dtype
    made: list[Generated] = []
    with progress_bar(len(seeds), desc="class images", unit="img", enabled=progress) as bar:
        for start in range(0, len(seeds), BATCH):
            chunk = seeds[start: start + BATCH]
            generators = [torch.Generator().manual_seed(s) for s in chunk]
            chunk_prompts = [_prompt_for(s, prompts) for s in chunk]
            # Frozen weights may be in half precision while the VAE stays fp32: autocast bridges them.
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                images = pipe(chunk_prompts, num_inference_steps=steps, guidance_scale=GUIDANCE,
                              generator=generators, height=resolution, width=resolution).images
            for seed, prompt, image in zip(chunk, chunk_prompts, images):
                slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "class"
                entry = Generated(f"{slug}-{base[:8]}-{seed:05d}.png", prompt, seed, base)
                atomic_write_via(folder / entry.file, image.save)
                manifest.append(entry)
                made.append(entry)
            _write_manifest(folder, manifest)
            bar.update(len(chunk))
    return made
