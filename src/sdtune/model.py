"""SDModel: one object holding a Stable Diffusion model's parts, loaded from any of the specs users have."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SdtuneError

FAMILIES = ("sd1", "sd2", "sdxl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SPEC_HELP = ("give a diffusers pipeline folder, a .safetensors/.ckpt checkpoint, a hub id (org/name), "
             "'builtin', tiny:sd1|sd2|sdxl or random:sd15|sd2|sdxl")


TEXT_ENCODER_SLOTS = {"text_encoder": 0, "text_encoder_2": 1}  # components() names -> text_encoders index


@dataclass
class SDModel:
    """The parts of a Stable Diffusion model plus what sdtune needs to know about them."""

    family: str
    prediction_type: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    scheduler: object
    source: str
    extras: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native training/generation resolution in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def components(self) -> dict[str, torch.nn.Module]:
        """Trainable-capable modules by the names diffusers pipelines and artifact keys use."""
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoders[0]}
        if len(self.text_encoders) > 1:
            parts["text_encoder_2"] = self.text_encoders[1]
        return parts

    def replace(self, name: str, module: torch.nn.Module) -> None:
        """Put `module` in the place components() calls `name` (e.g. a sharded UNet's gathered copy)."""
        if name in TEXT_ENCODER_SLOTS:
            self.text_encoders[TEXT_ENCODER_SLOTS[name]] = module
        else:
            setattr(self, name, module)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDModel":
        for module in self.components().values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def noise_scheduler(self):
        """The DDPM scheduler used for training, sharing the inference scheduler's betas and target."""
        from diffusers import DDPMScheduler

        config = dict(self.scheduler.config)
        config["prediction_type"] = self.prediction_type
        return DDPMScheduler.from_config(config)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (no copies), for generation and saving."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = scheduler or self.scheduler
        if self.family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
                scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # sdtune shows its own progress (or none with --quiet); diffusers' per-image bars would interleave with
        # it, and be carriage-return noise in a log (a training run's validation images among them)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def fingerprint(self) -> str:
        """Short, cheap identity of the base weights: configs plus a sample of each component's tensors."""
        if "fingerprint" not in self.extras:
            digest = hashlib.sha256()
            for name, module in self.components().items():
                digest.update(name.encode())
                config = getattr(module, "config", None)
                digest.update(json.dumps(_plain(config), sort_keys=True, default=str).encode())
                for _, tensor in list(module.state_dict().items())[:8]:
                    digest.update(tensor.detach().float().cpu().flatten()[:4096].numpy().tobytes())
            self.extras["fingerprint"] = digest.hexdigest()[:16]
        return self.extras["fingerprint"]


def _plain(config) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# Loading ----------------------------------------------------------------------------------------------------

def load(spec: str, dtype: torch.dtype | None = None, config: str | None = None) -> SDModel:
    """Load a model from a spec; `config`, a local diffusers folder, overrides the architecture a single-file
    checkpoint is otherwise read as (see single_file)."""
    spec = str(spec)
    if spec == "builtin":
        from .toyworld import builtin_path
        from .toyworld.conventions import prompt_conventions

        model = _load_pipeline_folder(builtin_path(), "builtin", dtype)
        model.extras.update(prompt_conventions())
        return model
    if spec.startswith(("tiny:", "random:")):
        return build_from_config(spec, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdtuneError(f"{spec} is a folder but not a diffusers pipeline (no model_index.json); {SPEC_HELP}.")
        return _load_pipeline_folder(path, spec, dtype)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise SdtuneError(f"Model file {spec} does not exist.")
        return _load_single_file(path, dtype, config)
    if _looks_like_hub_id(spec):
        return _load_pipeline_folder(spec, spec, dtype)
    raise SdtuneError(f"Unknown model '{spec}': {SPEC_HELP}.")


def base_model_from_card(metadata: dict[str, str]) -> str | None:
    """The base model an artifact's run card names, where it loads here without a download and without
    full-size memory: the builtin model, a tiny:* architecture, or a local folder or file that exists."""
    spec = metadata.get("base_model") or ""
    if spec == "builtin" or spec.startswith("tiny:"):
        return spec
    if spec and not spec.startswith("random:") and Path(spec).expanduser().exists():
        return spec
    return None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists() and " " not in spec


def _load_pipeline_folder(where, label: str, dtype) -> SDModel:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(where), torch_dtype=dtype, safety_checker=None)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise SdtuneError(f"Could not load model '{label}': {str(exc).splitlines()[0]}") from exc
    return from_pipeline(pipe, label)


def _load_single_file(path: Path, dtype, config: str | None) -> SDModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .methods.dreambooth import load_single_file

    tuned = load_single_file(path, dtype) if config is None else None  # a DreamBooth file: its card names its base
    if tuned is not None:
        return tuned
    if config is None:  # the architecture, tokenizers and prediction type come from the file itself
        from .single_file import load_checkpoint_file

        return load_checkpoint_file(path, dtype)
    is_xl = (Path(config) / "text_encoder_2").exists()
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(path), config=str(config), torch_dtype=dtype,
                                    local_files_only=True)
    except Exception as exc:  # diffusers raises many types for unreadable checkpoints
        raise SdtuneError(f"Could not load checkpoint {path.name}: {str(exc).splitlines()[0]}") from exc
    return from_pipeline(pipe, str(path))


def from_pipeline(pipe, source: str) -> SDModel:
    """Wrap a loaded diffusers SD/SDXL pipeline."""
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae") or not hasattr(pipe, "text_encoder"):
        raise SdtuneError(f"'{source}' is not a Stable Diffusion pipeline (it has no unet/vae/text_encoder).")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    family = _detect_family(pipe.unet, encoders)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    return SDModel(family, prediction, pipe.unet, pipe.vae, encoders, tokenizers, pipe.scheduler, source)


def _detect_family(unet, encoders) -> str:
    if len(encoders) > 1 or unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2's OpenCLIP encoder uses plain GELU and linear projections in the UNet; SD1 uses CLIP's quick_gelu.
    cross = unet.config.cross_attention_dim
    if cross == 1024 or (cross != 768 and unet.config.get("use_linear_projection")):
        return "sd2"
    return "sd1"


def build_from_config(spec: str, dtype: torch.dtype | None = None, seed: int = 0,
                      device: str | torch.device = "cpu") -> SDModel:
    """Build a random-init model of a known architecture (tiny:* for tests, random:* for benchmarks).

    device="meta" gives the structure without memory (layer names and shapes, e.g. to convert files);
    device="cuda" initialises full-size benchmark models directly on the GPU.
    """
    from .model_configs import ARCHITECTURES

    if spec not in ARCHITECTURES:
        raise SdtuneError(f"Unknown model '{spec}': known built architectures are {', '.join(ARCHITECTURES)}.")
    arch = ARCHITECTURES[spec]
    tokenizers = [tiny_tokenizer()] * len(arch["text"])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet, vae, encoders = build_modules(arch, tokenizers)
    model = SDModel(arch["family"], arch["prediction_type"], unet, vae, encoders, tokenizers,
                    make_scheduler(arch["scheduler"], arch["prediction_type"]), spec)
    for module in model.components().values():
        module.eval()
        if dtype is not None:
            module.to(dtype)
    return model


def tiny_tokenizer():
    """The miniature models' tokenizer: byte-level plus whole words for the test vocabulary."""
    from transformers import CLIPTokenizer

    from .model_configs import TINY_WORDS
    from .tokenizer_build import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, TINY_WORDS))


def build_modules(arch: dict, tokenizers: list) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    """(unet, vae, text encoders) of an architecture dict (see model_configs), on the current default device;
    each text encoder takes its token ids from the tokenizer beside it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**arch["unet"])
    vae = AutoencoderKL(**arch["vae"])
    encoders = []
    for i, (text, tokenizer) in enumerate(zip(arch["text"], tokenizers)):
        text_cfg = CLIPTextConfig(**{"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 1, **text})
        # SDXL's second encoder exposes the pooled projection the UNet's added conditioning needs.
        cls = CLIPTextModelWithProjection if (arch["family"] == "sdxl" and i == 1) else CLIPTextModel
        encoders.append(cls(text_cfg))
    return unet, vae, encoders


def make_scheduler(name: str, prediction_type: str):
    """An inference scheduler of the diffusers class `name` with SD's training betas."""
    import diffusers

    from .model_configs import SCHEDULER_BASE

    config = dict(SCHEDULER_BASE, prediction_type=prediction_type)
    if name == "PNDMScheduler":
        config["skip_prk_steps"] = True
    return getattr(diffusers, name).from_config(config)


FAMILY_ARCHITECTURE = {"sd1": "random:sd15", "sd2": "random:sd2", "sdxl": "random:sdxl"}


def architecture(family: str) -> SDModel:
    """The standard full-size architecture of a family, on the meta device (names and shapes only)."""
    if family not in FAMILY_ARCHITECTURE:
        raise SdtuneError("Cannot tell which model family this file is for; pass --model with its base model.")
    return build_from_config(FAMILY_ARCHITECTURE[family], device="meta")
