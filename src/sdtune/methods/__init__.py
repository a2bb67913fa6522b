"""The method protocol (the one extension point) and the registry of the four methods."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..errors import SdtuneError

# CLI name -> (module in sdtune.methods, class name); imported lazily so the CLI starts fast.
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "LoRA"),
    "textual-inversion": ("textual_inversion", "TextualInversion"),
    "dreambooth": ("dreambooth", "DreamBooth"),
    "hypernetwork": ("hypernetwork", "Hypernetwork"),
}


class Method(Protocol):
    """What the shared training loop, generation and conversion need from a personalisation method."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def setup(self, model, cfg) -> list[torch.nn.Parameter] | list[dict]:
        """Freeze the model, inject what trains, return the trainable parameters (or optimizer param
        groups: dicts with "params" and optionally "lr", "lr_factor" (times the run's lr) and "stop_after" (a step
        after which they freeze))."""

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """The trained values under canonical keys (component-prefixed module paths)."""

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put trained values back after `setup` (resume from a checkpoint)."""

    def metadata(self) -> dict[str, str]:
        """Method facts for the run card: rank, alpha, tokens, layer structure..."""

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        """How to generate with what `save` wrote on base `model`: `sdtune generate` arguments (printed after
        training)."""

    def apply(self, model, state: dict[str, torch.Tensor], weight: float = 1.0, name: str = "") -> None:
        """Inference: inject the learned state into `model`, scaled by `weight`."""

    def output_files(self, name: str, fmt: str | None) -> list[str]:
        """The paths `save` writes, relative to the output folder (a trailing '/' marks a folder): checked
        before training starts, so nothing that sdtune did not make is replaced."""

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None) -> list[Path]:
        """Write the artifact(s) atomically at `output_files(name, fmt)`; return the paths written."""

    # Optional capabilities the loop and tools use when a method has them (checked with hasattr):
    #   check_data(model, data_cfg)        validate/warn about the data before setup (e.g. a common token)
    #   prompt_templates(model) -> list    per-sample prompt wordings instead of one instance template
    #   saves_frozen_weights: bool         the artifact holds frozen weights too: keep them full precision
    #   planned_files(model, name) -> {file: tensors}   what save() writes, computable on a meta-device model
    #                                      (sdtune bench sizes a full-size artifact from it without memory)
    #   decode_file(model, obj, metadata, path) -> state   read any file layout of this method
    #   recognises(obj, metadata) / convert(obj, metadata, src, dst, to, model_spec)   for `sdtune convert`
    #   client_usage(path) -> str          how other tools use the written file (printed after training)


def registry() -> dict[str, type]:
    """The method classes that are available, by CLI name."""
    found = {}
    for name, (module, cls) in METHODS.items():
        try:
            found[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
    return found


def get(name: str) -> type:
    methods = registry()
    if name not in methods:
        raise SdtuneError(f"Unknown method '{name}'; available methods are {', '.join(methods)}.")
    return methods[name]
