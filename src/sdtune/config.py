"""Configuration dataclasses, one per concern, with the validation rules kept beside each field.

Each field's metadata carries its help text and its allowed range/choices; the CLI builds its flags from
these fields and `validate` checks any value the same way, whether it came from a flag or a YAML/TOML file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SdtuneError

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Speed settings (resolved per device and run by sdtune.speed; none changes what is learned).
DISTRIBUTED_MODES = ("auto", "ddp", "fsdp")  # parallel.py: how several processes share a run
COMPILE_MODES = ("auto", "off", "cuda-graphs", "default", "reduce-overhead", "max-autotune")
ADAM_IMPLS = ("auto", "fused", "foreach", "for-loop")
# Image sides past this need more memory than a CPU box has (and more than any SD model was trained at).
MAX_PIXELS = 4096
# torch.manual_seed takes 64-bit seeds; sdtune derives others by adding small offsets, so it keeps to 63 bits.
MAX_SEED = 2**63 - 1
# Sampling steps of `sdtune generate` and the UI's Generate tab when none are given (diffusers' own default).
GENERATE_STEPS = 50


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, flag: str | None = None) -> Any:
    """A dataclass field with CLI help and validation bounds."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the subject images are and how they become training examples."""

    images: str = opt("", "folder of subject images (png/jpg/jpeg/webp, optional same-stem .txt captions)")
    token: str = opt("sks", "the identifier/new word the subject is learned under")
    class_word: str = opt("", "the subject's class (e.g. dog); used in prompts and by prior preservation")
    prompt_template: str = opt("", "instance prompt; {token} and {class_word} are substituted "
                                   "(default: the base model's own template)")
    use_captions: bool = opt(False, "use same-stem .txt captions instead of the template")
    resolution: int = opt(0, "training resolution in pixels (0: the model's native resolution)", min=0,
                         max=MAX_PIXELS)
    center_crop: bool = opt(True, "center crop (otherwise random crop)")
    flip: bool = opt(False, "random horizontal flips")
    buckets: bool = opt(False, "aspect-ratio buckets instead of square crops")
    repeats: int = opt(1, "how many times each image appears per epoch", min=1)
    class_images: str = opt("", "folder of class images for prior preservation; topped up with generated "
                                "ones when short (default: OUTPUT/class_images)")
    num_class_images: int = opt(100, "class images wanted for prior preservation", min=1)
    class_prompt: str = opt("", "prompt for generating and training on class images (default: from the class word)")
    class_image_steps: int = opt(50, "sampling steps per generated class image", min=1)
    validation_images: str = opt("", "folder of held-out images (same layout as --images) whose denoising loss "
                                     "at fixed noise and timesteps is logged through the run")


@dataclass
class TrainConfig:
    """The shared training loop's settings (identical for every method)."""

    steps: int = opt(500, "optimizer steps", min=1, max=10_000_000)
    lr: float = opt(1e-4, "learning rate", min=0.0, max=10.0)
    scale_lr: bool = opt(False, "multiply the learning rate by the global batch size")
    batch_size: int = opt(1, "images per step per process", min=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", min=1)
    seed: int = opt(0, "seed for noise, timesteps, data order and initialisation", min=0, max=MAX_SEED)
    device: str = opt("auto", "where to train", choices=("auto", "cpu", "cuda", "mps"))
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (CUDA only)")
    lr_scheduler: str = opt("constant", "learning-rate schedule", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, "learning-rate warm-up steps", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", min=0.0)
    weight_decay: float = opt(1e-2, "AdamW weight decay", min=0.0)
    offset_noise: float = opt(0.0, "offset-noise strength", min=0.0, max=1.0)
    min_timestep: int = opt(0, "lowest training timestep drawn (kohya's --min_timestep)", min=0)
    max_timestep: int = opt(0, "training timesteps are drawn below this (kohya's --max_timestep; 0: the "
                            "scheduler's count, 1000)", min=0)
    min_snr_gamma: float = opt(0.0, "min-SNR loss weighting gamma (0 disables)", min=0.0)
    prior_preservation: bool = opt(False, "add the class-image loss (DreamBooth prior preservation)")
    prior_loss_weight: float = opt(1.0, "weight of the class-image loss", min=0.0)
    cache_latents: bool = opt(True, "encode images once when no random augmentation is active")
    compile: str = opt("auto", "how the UNet step runs: off (eager), cuda-graphs (eager kernels replayed from a "
                               "captured CUDA graph), or a torch.compile mode; auto: the fastest for this device "
                               "and run length", choices=COMPILE_MODES)
    channels_last: bool = opt(False, "channels-last memory layout for the UNet")
    adam_impl: str = opt("auto", "AdamW implementation (auto: fused on CUDA, torch's default elsewhere)",
                         choices=ADAM_IMPLS)
    sync_every: int = opt(0, "read the loss on the host every N steps: progress, logs and the divergence check "
                             "(0: every step on a CPU, every 25 on CUDA)", min=0)
    ema_decay: float = opt(0.0, "keep an exponential moving average of the trained weights and save it "
                                "(e.g. 0.9999; 0 disables)", min=0.0, max=1.0)
    checkpoint_every: int = opt(0, "save a resumable checkpoint every N steps (0: only at the end)", min=0)
    keep_checkpoints: int = opt(2, "how many checkpoints to keep", min=1)
    resume: str = opt("", "resume from a checkpoint folder, or 'latest'")
    validation_every: int = opt(0, "write validation images every N steps (0: never)", min=0)
    validation_prompt: str = opt("", "validation prompt (default: the instance prompt)")
    validation_loss_every: int = opt(0, "read the validation loss every N steps (0: ten times per run); "
                                        "needs --validation-images", min=0)
    log_dir: str = opt("", "tensorboard log folder (default: OUTPUT/logs; 'none' disables)")
    distributed: str = opt("auto", "how several processes (torchrun) share the run: ddp (each holds the whole "
                                   "model, gradients averaged during the backward pass) or fsdp (DreamBooth: "
                                   "weights, gradients and Adam state sharded); auto: ddp",
                           choices=DISTRIBUTED_MODES)
    distributed_timeout: int = opt(1800, "seconds a process waits for the others before the run stops with an "
                                         "error naming the silent one", min=10)


def validate(config: Any, section: str = "") -> None:
    """Raise SdtuneError naming the first field whose value is outside its allowed range or choices."""
    for f in fields(config):
        value = getattr(config, f.name)
        name = f"{section}.{f.name}" if section else f.name
        meta = f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            shown = "NaN" if math.isnan(value) else value
            raise SdtuneError(f"{name} is {shown}; give a finite number{_range_text(meta)}.")
        if meta.get("choices") and value not in meta["choices"]:
            raise SdtuneError(f"{name} is '{value}'; allowed values are {', '.join(map(str, meta['choices']))}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = meta.get("min"), meta.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                raise SdtuneError(f"{name} is {value}; it must be{_range_text(meta)}.")


def _range_text(meta) -> str:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" at least {low}"
    if high is not None:
        return f" at most {high}"
    return ""


# Config files are small; refusing bigger ones (and YAML that expands past a node budget through anchors
# and aliases, the "billion laughs") before parsing bounds the memory and time a hostile file can take.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or TOML config file into a nested dict ({'train': {...}, 'data': {...}, 'lora': {...}})."""
    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"Config file {path} does not exist.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SdtuneError(f"Config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB; "
                          "a config holds a few settings, so pass the right file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SdtuneError(f"Config file {path} is not UTF-8 text; re-save it as UTF-8.") from None
    try:
        data = _parse(path, text)
    except SdtuneError:
        raise
    except Exception as exc:  # both parsers raise their own error types
        raise SdtuneError(f"Config file {path} could not be parsed: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise SdtuneError(f"Config file {path} must hold a mapping of sections to settings.")
    section = next((name for name, values in data.items() if not isinstance(values, dict)), None)
    if section is not None:
        raise SdtuneError(f"Config file {path} section '{section}' must be a mapping of settings, e.g. steps: 500.")
    return data


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise SdtuneError(f"Config file {path} expands to more than {MAX_YAML_NODES:,} values through YAML "
                              "aliases; write the settings out without anchors.")
        return loader.construct_document(node) if node is not None else {}
    finally:
        loader.dispose()


def _expanded_size(node: Any, sizes: dict[int, int], active: set[int]) -> int:
    """Nodes in the YAML tree once every alias is expanded (shared nodes counted once per use, in linear time)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:  # a recursive anchor expands forever
        return MAX_YAML_NODES + 1
    active.add(key)
    children = node.value if isinstance(node.value, list) else []
    items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
    sizes[key] = 1 + sum(_expanded_size(item, sizes, active) for item in items)
    active.discard(key)
    return sizes[key]


def build(cls, values: dict, section: str):
    """Make a `cls` from a dict, refusing unknown keys by name, then validate it."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SdtuneError(f"Unknown setting '{section}.{unknown[0]}'; known settings are {', '.join(sorted(known))}.")
    coerced = {}
    for f in fields(cls):
        if f.name in values:
            coerced[f.name] = _coerce(values[f.name], f, section)
    config = cls(**coerced)
    validate(config, section)
    return config


def _coerce(value: Any, f: dataclasses.Field, section: str) -> Any:
    """`value` as the field's type, strictly: bool is not a number, lists and tables are not strings."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else type(f.default_factory())
    return _COERCERS.get(kind, _as_is)(value, f"{section}.{f.name}")


def _shown(value: Any, limit: int = 60) -> str:
    """A value for a one-line message, cut short (a config can hold a huge list)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise SdtuneError(f"{name} must be true or false, not {_shown(value)}.")
    return value


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise SdtuneError(f"{name} must be text, not {_shown(value)}; quote it in the config file.")
    return value


def _as_float(value: Any, name: str) -> float:
    # Strings are accepted: YAML reads 1e-4 (no dot) as text, and the UI's text boxes give text.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SdtuneError(f"{name} must be a number, not {_shown(value)}.")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise SdtuneError(f"{name} must be a number, not {_shown(value)}.") from None
    return number  # validate() refuses NaN and infinity, naming the field's range


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)  # exact, even past a float's 53 bits (seeds)
    number = _as_float(value, name)
    if not math.isfinite(number):
        raise SdtuneError(f"{name} is {_shown(value)}; give a finite whole number.")
    if number != int(number):
        raise SdtuneError(f"{name} must be a whole number, not {_shown(value)}.")
    return int(number)


def _as_is(value: Any, name: str) -> Any:
    return value


_COERCERS = {bool: _as_bool, str: _as_str, float: _as_float, int: _as_int}


def to_json(*configs: Any) -> str:
    """The resolved configuration, as saved beside outputs and in run cards."""
    return json.dumps({type(c).__name__: dataclasses.asdict(c) for c in configs}, sort_keys=True)
