"""Generation: model + artifacts named in an A1111-style prompt -> images, with diffusers' defaults."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GENERATE_STEPS, MAX_PIXELS, MAX_SEED
from .errors import SdtuneError
from .faults import generation_memory_advice
from .infotext import PNG_KEY, Applied, Infotext, model_identity, save_image
from .prompt_embeds import pipeline_prompt_kwargs

Report = Callable[[str], None]  # told one line per artifact file a prompt activated (the CLI prints to stderr)


def _silent(line: str) -> None:
    """The default report: say nothing (library callers and the UI)."""


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
# diffusers scheduler class -> the sampler name A1111 writes in an image's parameters for the same method
# (PNDM without its PRK steps is PLMS); Karras sigmas are A1111's "Schedule type: Karras". DDPM has no A1111
# sampler: Forge and ComfyUI call it DDPM. A class not listed is named by its class.
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
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
    report: Report = _silent


# Option -> (flag, type, lowest, highest): checked before a model loads, so nothing is sampled or allocated
# first. Schedulers are trained on 1000 timesteps (more steps than that are refused by them); -n is sampled in
# chunks of CHUNK, but every image stays in memory until it is saved.
LIMITS: dict[str, tuple[str, type | tuple[type, ...], float, float]] = {
    "steps": ("--steps", int, 1, 1000),
    "count": ("-n/--count", int, 1, 100),
    "seed": ("--seed", int, 0, MAX_SEED),
    "clip_skip": ("--clip-skip", int, 1, 48),  # the model's own layer count is checked once it is loaded
    "width": ("--width", int, 0, MAX_PIXELS),
    "height": ("--height", int, 0, MAX_PIXELS),
    "guidance": ("--guidance", (int, float), -100.0, 100.0),  # past this fp32 sampling overflows into NaN images
}
SIZE_MULTIPLE = 8  # diffusers' check_inputs refuses image sides that are not multiples of 8
CHUNK = 8  # images sampled at once: memory stays that of 8 images whatever -n is


def check_options(options: GenerateOptions) -> None:
    """Refuse out-of-range, non-finite or half-given options in one sentence naming the flag."""
    for name, (flag, kind, low, high) in LIMITS.items():
        value = getattr(options, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise SdtuneError(f"{flag} is {value!r}; give a {'whole ' if kind is int else ''}number.")
        if not low <= value <= high:  # NaN fails both comparisons
            raise SdtuneError(f"{flag} is {value}; it must be between {low} and {high}.")
    for flag, value in (("--width", options.width), ("--height", options.height)):
        if value % SIZE_MULTIPLE:
            raise SdtuneError(f"{flag} {value} is not a multiple of {SIZE_MULTIPLE}; "
                              f"use e.g. {max(SIZE_MULTIPLE, value - value % SIZE_MULTIPLE)}.")
    # One side alone would leave the aspect ratio to a guess (diffusers silently drops it); ask for both.
    if bool(options.width) != bool(options.height):
        raise SdtuneError("--width and --height go together; give both (or neither for the model's native size).")


def check_clip_skip(model, clip_skip: int) -> None:
    """Refuse a clip skip past the text encoder's layers (SDXL already skips one)."""
    layers = min(encoder.config.num_hidden_layers for encoder in model.text_encoders)
    usable = layers - (1 if model.family == "sdxl" else 0)
    if clip_skip > usable:
        raise SdtuneError(f"--clip-skip {clip_skip} is past this model's {usable} usable text-encoder layers; "
                          f"use 1 to {usable}.")


def make_scheduler(model, name: str):
    import diffusers

    if not name:
        return model.scheduler
    if name not in SCHEDULERS:
        raise SdtuneError(f"Unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}.")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config({**model.scheduler.config, **extra})


def apply_prompt_artifacts(model, prompt: str, artifact_dirs: list[Path],
                           report: Report = _silent) -> tuple[str, list[Applied]]:
    """Apply every artifact a prompt tag names (<lora:...>, <hypernet:...>: the registered methods' tags),
    reporting each file; return the prompt without the tags and what was applied."""
    from .methods import by_prompt_tag
    from .prompt import parse_artifact_tags, resolve_artifact

    text, tags = parse_artifact_tags(prompt)
    methods = by_prompt_tag()
    applied = []
    for tag in tags:
        path = resolve_artifact(tag, artifact_dirs)
        tensors, metadata = load_for_model(model, path)
        cls = methods[tag.kind]
        method = cls()
        method.apply(model, method.decode_file(model, tensors, metadata, path), tag.weight, name=tag.name)
        applied.append(Applied(cls, tag.kind, tag.name, tag.weight, path))
        report(applied[-1].report())
    return text, applied


def load_for_model(model, path: Path) -> tuple:
    """(tensors, metadata) of an artifact, refused when its run card names another model family: tensor
    widths alone can match by chance (a file without a run card, e.g. a download, is judged by widths)."""
    from .artifacts import load_artifact

    tensors, metadata = load_artifact(path)
    check_family(metadata, model, path)
    return tensors, metadata


def check_family(card: dict[str, str], model, path: Path) -> None:
    """Refuse an artifact whose run card names another model family than `model`'s (a pickle keeps its card
    inside, where the method's reader finds it)."""
    recorded = card.get("base_family")
    if recorded and recorded != model.family:
        raise SdtuneError(f"{path} was trained on a {recorded} model and does not fit this {model.family} model; "
                          f"use it with a {recorded} --model.")


def activate_embeddings(model, texts: list[str], artifact_dirs: list[Path],
                        report: Report = _silent) -> tuple[list[str], list[Applied]]:
    """Load every file of a method that finds its files by name (Textual Inversion embeddings) whose name is
    written as a word in `texts` (earlier folders and shallower files win), reporting each file; return the
    texts with those names spelled as registered, which lets the pipeline expand a multi-vector name to all its
    vectors (tok -> "tok tok_1 tok_2", as diffusers does), and what was applied. A1111's convention makes any
    file stem a trigger word, so the report says which files a prompt woke."""
    from .methods import listing, registry

    finders = [cls for cls in registry().values() if cls.found_by_name]
    active: set[str] = set()
    applied = []
    for cls in finders:
        method = cls()
        for path in _artifact_files(artifact_dirs, tuple(dict.fromkeys(lay.suffix for lay in cls.layouts))):
            name = next((n for n in cls.prompt_words(path) if n.lower() not in active and _word_in(n, texts)), None)
            if name is None:
                continue
            obj, metadata = load_for_model(model, path)
            if not cls.recognises(obj, metadata):
                continue  # e.g. a hypernetwork .pt whose stem is also a word of the prompt
            state = method.decode_file(model, obj, metadata, path)
            method.apply(model, state, name=name)
            active.add(name.lower())
            applied.append(Applied(cls, cls.file_noun, name, 1.0, path))
            report(applied[-1].report(method.describe(state)))
    if finders:
        _refuse_unknown_new_words(model, texts, active, artifact_dirs, listing([c.file_noun for c in finders], "or"))
    for name in active:
        texts = [_word_pattern(name).sub(lambda _, n=name: n, t) for t in texts]
    return texts, applied


# How a learned word is written (diffusers' "<cat-toy>"); artifact tags such as <lora:x:1> carry a colon.
NEW_WORD = re.compile(r"<[^<>:\s]+>")


def _refuse_unknown_new_words(model, texts: list[str], active: set[str], artifact_dirs: list[Path],
                              noun: str) -> None:
    """A misspelled embedding would be read as plain text, silently; refuse a <word> that no file found by name
    answers to and that the tokenizers do not already hold as one token."""
    for word in (w for text in texts for w in NEW_WORD.findall(text)):
        known = word.lower() in active or any(len(tok.encode(word, add_special_tokens=False)) == 1
                                              for tok in model.tokenizers)
        if not known:
            folders = ", ".join(map(str, artifact_dirs)) or "the artifact folders"
            raise SdtuneError(f"The prompt names {word}, but no {noun} in {folders} answers to it; check the "
                              "spelling, or pass the folder that holds it with --artifacts.")


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
    """Images (PIL) for `prompt`; the same seed gives the same images as a plain diffusers pipeline (for -n
    above CHUNK, as that many pipeline calls of CHUNK images drawing from one generator). Each carries A1111's
    parameters text in image.info (save_images writes it into the file)."""
    check_options(options)
    check_clip_skip(model, options.clip_skip)
    identity = model_identity(model)  # of the base weights, before artifacts change them
    text, applied = apply_prompt_artifacts(model, prompt, options.artifact_dirs, options.report)
    (text, negative), embeddings = activate_embeddings(model, [text, options.negative_prompt],
                                                       options.artifact_dirs, options.report)
    pipe = model.pipeline(make_scheduler(model, options.scheduler))
    extra = {"width": options.width or None, "height": options.height or None}
    if options.guidance is not None:
        extra["guidance_scale"] = options.guidance
    prompt_kwargs = pipeline_prompt_kwargs(model, text, negative, options.clip_skip)
    generator, images = torch.Generator().manual_seed(options.seed), []
    # inference_mode is ~10% faster than no_grad on a CPU; only the sampling, so artifacts applied above stay
    # ordinary tensors for a later training in the same process (the web UI)
    with torch.inference_mode(), generation_memory_advice():
        for start in range(0, options.count, CHUNK):
            result = pipe(**prompt_kwargs, num_inference_steps=options.steps, generator=generator,
                          num_images_per_prompt=min(CHUNK, options.count - start), **extra)
            images += result.images
    info = _infotext(identity, pipe, prompt, options, [*applied, *embeddings])
    for position, image in enumerate(images):
        image.info[PNG_KEY] = info.text(image.size, position, len(images))
    return images


def _infotext(identity: tuple[str, str], pipe, prompt: str, options: GenerateOptions,
              applied: list[Applied]) -> Infotext:
    """What the images were made with, in the terms of A1111's infotext (see sdtune.infotext); `identity`
    is the base model's (hash, name)."""
    scheduler = pipe.scheduler
    guidance = options.guidance
    if guidance is None:  # the pipeline's own default, read from its signature (None: not said)
        default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
        guidance = None if default is None else default.default
    model_hash, model_name = identity
    return Infotext(prompt, options.negative_prompt, options.steps,
                    A1111_SAMPLERS.get(type(scheduler).__name__, type(scheduler).__name__), guidance, options.seed,
                    model_hash, model_name, "Karras" if scheduler.config.get("use_karras_sigmas") else None,
                    options.clip_skip, applied)


def check_image_path(path: str | Path, count: int = 1) -> Path:
    """Refuse, before any work, an output path whose extension names no image format PIL writes, or whose
    images (PATH, and PATH-0 ... with several) would land on a folder, a device or a pipe."""
    from PIL import Image

    from .artifacts import refuse_special

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise SdtuneError(f"--output {path} does not end in an image extension; name it e.g. {path.stem or 'out'}.png.")
    if image_format not in Image.SAVE:  # e.g. .psd: PIL reads it but cannot write it
        raise SdtuneError(f"--output {path}: images cannot be written as {path.suffix}; "
                          f"name it e.g. {path.stem or 'out'}.png.")
    for target in image_paths(path, count):
        refuse_special(target)
    return path


def image_paths(path: str | Path, count: int) -> list[Path]:
    """Where `count` images go: PATH alone, or a grid at PATH and the images at PATH's stem + -0, -1, ..."""
    path = Path(path)
    return [path] + ([path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)] if count > 1 else [])


def save_images(images: list, path: str | Path) -> list[Path]:
    """One image at PATH; several at PATH's stem + -0, -1, ... and a grid of them at PATH, all or none; each
    with its A1111 parameters text where the format has room (sdtune.infotext.save_image)."""
    from .artifacts import atomic_write_many

    targets = image_paths(path, len(images))
    pictures = [image_grid(images), *images] if len(images) > 1 else images
    if len(images) > 1 and PNG_KEY in images[0].info:  # A1111 gives a grid its first image's text
        pictures[0].info[PNG_KEY] = images[0].info[PNG_KEY]
    return atomic_write_many([(target, lambda tmp, p=picture: save_image(p, tmp))
                              for target, picture in zip(targets, pictures)])


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
