"""DreamBooth: fine-tune the whole UNet (and optionally the text encoders) on the subject under a rare token.

Prior preservation, class images, caching, EMA and mixed precision belong to the shared loop; this method
only decides what trains (param groups with their own learning rate and stop step) and writes the two
artifacts users load: a diffusers pipeline folder `OUT/NAME/` and a single-file checkpoint
`OUT/NAME.safetensors` in the original LDM key layout (A1111 / ComfyUI / `from_single_file`).
Canonical state keys: `<component>.<parameter name>` for the components that train.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import SdtuneError
from ..formats import Layout
from ..formats.clients import CLIENTS, FULLY
from . import CompareRow, Method

SAVE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN_CARD_FILE = "sdtune_run_card.json"
# A single-token identifier whose id lies in the first part of the BPE merge list is a frequent word:
# CLIP's vocabulary is ordered by merge frequency ("dog" ~3%, "sks" ~97% of the merges).
COMMON_MERGE_FRACTION = 0.5
BYTE_TOKENS = 512  # CLIP BPE: 256 bytes + 256 end-of-word bytes come before the merges

log = logging.getLogger(__name__)


@dataclass
class DreamBoothConfig:
    """DreamBooth's own settings."""

    train_text_encoder: bool = opt(False, "also fine-tune the text encoder(s)")
    text_encoder_lr: float = opt(0.0, "text-encoder learning rate (0: the same as --lr)", min=0.0, max=10.0)
    train_text_encoder_steps: int = opt(0, "stop training the text encoder(s) after this many steps "
                                           "(0: train them for the whole run)", min=0)
    save_dtype: str = opt("fp32", "dtype of the saved folder and single file", choices=tuple(SAVE_DTYPES))


class DreamBooth(Method):
    """The DreamBooth method (see module docstring)."""

    name = "dreambooth"
    label = "DreamBooth"
    config_class = DreamBoothConfig
    default_lr = 5e-6
    # Both are written by every run. The single file is known by its run card (its keys say only that it is a
    # model) and loads wherever a checkpoint does: A1111's and Forge's models/Stable-diffusion, ComfyUI's
    # checkpoints, kohya's --pretrained_model_name_or_path, diffusers' from_single_file.
    layouts = (Layout("diffusers", "diffusers pipeline folder", suffix="/"),
               Layout("checkpoint", "Stable Diffusion checkpoint (A1111 / LDM single-file layout)",
                      keys=r"(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner)\..+",
                      card_only=True,
                      clients=tuple((client, FULLY) for client in CLIENTS)))
    saves_frozen_weights = True  # the artifact is the whole model: keep frozen parts exact
    shardable = True  # billions of trained values (SDXL): worth splitting across processes
    # builtin: measured on the builtin model (BENCHMARKS.md). With the prior, 5e-4 (the no-prior rate) wore the
    # class images' own prompts down (prior preservation 0.49); 2e-4 keeps them (0.92), same subject fidelity.
    # Without the prior, the four-subject search (4 subjects x 3 seeds) chose 2.5e-4 over 5e-4: subject fidelity
    # 0.55 against 0.53, and the prompts (0.93 against 0.80) and the class word (0.68 against 0.32) kept better.
    compare_rows = (
        CompareRow("dreambooth", "#1f77b4", {
            "builtin": {"train": {"steps": 450, "lr": 2.0e-4, "batch_size": 4, "prior_preservation": True}},
            "real": {"train": {"steps": 800, "lr": 5.0e-6, "batch_size": 1, "prior_preservation": True}}}),
        CompareRow("dreambooth-no-prior", "#17becf", {
            "builtin": {"train": {"steps": 300, "lr": 2.5e-4, "batch_size": 4, "prior_preservation": False}},
            "real": {"train": {"steps": 800, "lr": 5.0e-6, "batch_size": 1, "prior_preservation": False}}}),
    )

    def __init__(self, cfg: DreamBoothConfig | None = None):
        self.cfg = cfg or DreamBoothConfig()

    # Training -----------------------------------------------------------------------------------------------
    def check_data(self, model, data_cfg) -> None:
        """Warn (never fail) when the identifier is not a rare single token of the base model."""
        for problem in dict.fromkeys(token_problem(t, data_cfg.token, data_cfg.class_word, model.extras)
                                     for t in model.tokenizers):
            if problem:
                log.warning("DreamBooth token warning: %s", problem)

    def setup(self, model) -> list[dict]:
        for module in model.components().values():
            module.requires_grad_(False)
        groups = [{"params": _trainable(model.unet)}]
        if self.cfg.train_text_encoder:
            text = [p for name in self._text_components(model) for p in _trainable(model.components()[name])]
            group: dict = {"params": text}
            if self.cfg.text_encoder_lr:
                group["lr"] = self.cfg.text_encoder_lr
            if self.cfg.train_text_encoder_steps:
                group["stop_after"] = self.cfg.train_text_encoder_steps
            groups.append(group)
        return groups

    def _text_components(self, model) -> list[str]:
        return [name for name in model.components() if name.startswith("text_encoder")]

    def _trained_components(self, model) -> list[str]:
        return ["unet"] + (self._text_components(model) if self.cfg.train_text_encoder else [])

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        components = model.components()
        return {f"{name}.{key}": value.detach().to("cpu", torch.float32).contiguous()
                for name in self._trained_components(model)
                for key, value in components[name].state_dict().items()}

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        for name, weights in _split(state).items():
            module = model.components().get(name)
            if module is None:
                raise SdtuneError(f"Checkpoint has weights for {name}, which this model does not have.")
            result = module.load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise SdtuneError(f"Checkpoint does not fit this model ({name}.{result.unexpected_keys[0]}).")

    def metadata(self) -> dict[str, str]:
        return {"train_text_encoder": str(self.cfg.train_text_encoder).lower(),
                "text_encoder_lr": str(self.cfg.text_encoder_lr),
                "train_text_encoder_steps": str(self.cfg.train_text_encoder_steps),
                "save_dtype": self.cfg.save_dtype}

    # Inference ----------------------------------------------------------------------------------------------
    def apply(self, model, state: dict[str, torch.Tensor], weight: float = 1.0, name: str = "") -> None:
        """Move `model`'s weights `weight` of the way to the tuned ones (1: the tuned model itself)."""
        for component, weights in _split(state).items():
            params = model.components()[component].state_dict()
            with torch.no_grad():
                for key, value in weights.items():
                    params[key].lerp_(value.to(params[key].device, params[key].dtype), weight)

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None = None) -> list[Path]:
        """The diffusers pipeline folder OUT/NAME/ and the single file OUT/NAME.safetensors, each atomic."""
        from ..formats.checkpoint import save_checkpoint

        dtype = SAVE_DTYPES[self.cfg.save_dtype]
        folder_name, single_name = self.output_files(name, fmt)
        folder = save_pipeline_folder(model, Path(out_dir) / folder_name.rstrip("/"), card, dtype)
        single = save_checkpoint(model, Path(out_dir) / single_name, card, dtype)
        return [folder, single]

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        return f'--model {Path(out_dir) / name} --prompt "a {token} ..."'

    def output_files(self, name: str, fmt: str | None = None) -> list[str]:
        """What `save` writes into the output folder: the pipeline folder (trailing /) and the single file."""
        return [f"{name}/", f"{name}.safetensors"]

    def planned_files(self, model, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors `save` writes, by file, in the save dtype, without writing them: works on a meta-device
        model, so a full-size artifact is sized without allocating it."""
        from ..formats.checkpoint import to_checkpoint

        dtype = SAVE_DTYPES[self.cfg.save_dtype]
        files = {f"{name}/{component}": {k: v.to(dtype) if v.is_floating_point() else v
                                          for k, v in module.state_dict().items()}
                 for component, module in model.components().items()}
        files[f"{name}.safetensors"] = to_checkpoint(model, dtype)
        return files


def save_pipeline_folder(model, folder: Path, card: dict[str, str], dtype: torch.dtype) -> Path:
    """`model` as a diffusers pipeline folder (weights in `dtype`, run card beside them), written atomically."""
    from safetensors.torch import load_file, save_file

    from ..artifacts import atomic_output_dir

    with atomic_output_dir(folder) as tmp:
        model.pipeline().save_pretrained(tmp, safe_serialization=True)
        for weights_file in tmp.rglob("*.safetensors"):
            tensors = load_file(weights_file)
            if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
                cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
                save_file(cast, weights_file, metadata={"format": "pt"})
        (tmp / RUN_CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=True))
    return folder


def load_single_file(path: Path, dtype: torch.dtype | None = None):
    """A DreamBooth single file as a model: the base its run card names (builtin, tiny:*, a local folder or file)
    given the file's weights, so it loads with no --model-config. None when the file is no DreamBooth file or its
    base does not load here; the caller then loads it as any checkpoint."""
    from safetensors import SafetensorError, safe_open

    from ..artifacts import load_artifact
    from ..formats.checkpoint import load_checkpoint
    from ..model import base_model_from_card, load

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # the header only: the card decides
            card = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return None  # not a safetensors file: the checkpoint loader says what is wrong with it
    base = base_model_from_card(card) if card.get("method") == DreamBooth.name else None
    if base is None or Path(base).expanduser().resolve() == Path(path).resolve():
        return None
    tensors, _ = load_artifact(path)
    model = load(base, dtype)
    load_checkpoint(model, tensors)
    model.source = str(path)
    return model


def token_problem(tokenizer, token: str, class_word: str = "", extras: dict | None = None) -> str | None:
    """Why `token` is a poor DreamBooth identifier for this tokenizer, or None when it is a rare single token."""
    pieces = tokenizer.tokenize(token)
    advice = "pick a rare single-token word (e.g. 'sks') so the subject does not overwrite a word the model knows"
    if len(pieces) != 1:
        return f"'{token}' is split into {len(pieces)} tokens ({' '.join(pieces)}); {advice}."
    if class_word and token.lower() == class_word.lower():
        return f"'{token}' is the class word itself; {advice}."
    declared = (extras or {}).get("rare_tokens")
    if declared is not None:  # a model that knows its own rare tokens (the builtin one) says so
        return None if token in declared else f"'{token}' is a word this model was trained on; {advice}."
    token_id = tokenizer.convert_tokens_to_ids(pieces[0])
    merges = max(len(tokenizer) - BYTE_TOKENS, 1)
    if token_id < BYTE_TOKENS or (token_id - BYTE_TOKENS) / merges < COMMON_MERGE_FRACTION:
        return f"'{token}' is a common word for this tokenizer; {advice}."
    return None


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = list(module.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        grouped.setdefault(component, {})[rest] = value
    return grouped
