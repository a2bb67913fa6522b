"""The method protocol (the one extension point) and the registry of the four methods."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..errors import SdtuneError


class Method(Protocol):
    """What the shared training loop, generation and conversion need from a personalisation method."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def setup(self, model, cfg) -> list[torch.nn.Parameter]:
        """Freeze the model, inject what trains, return the trainable parameters."""

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """The trained values under canonical keys (component-prefixed module paths)."""

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put trained values back after `setup` (resume from a checkpoint)."""

    def metadata(self) -> dict[str, str]:
        """Method facts for the run card: rank, alpha, tokens, layer structure..."""

    def apply(self, model, state: dict[str, torch.Tensor], weight: float = 1.0, name: str = "") -> None:
        """Inference: inject the learned state into `model`, scaled by `weight`."""

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str) -> list[Path]:
        """Write the artifact(s) atomically; return the paths written."""


def registry() -> dict[str, type]:
    """Method classes by CLI name; imported lazily so the CLI starts fast."""
    from .lora import LoRA

    return {cls.name: cls for cls in (LoRA,)}


def get(name: str) -> type:
    methods = registry()
    if name not in methods:
        raise SdtuneError(f"Unknown method '{name}'; available methods are {', '.join(methods)}.")
    return methods[name]
