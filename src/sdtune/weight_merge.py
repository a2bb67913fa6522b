"""Applying a LoRA-family file by adding its update into the model's own weights, as A1111 and ComfyUI do.

LoHa, LoKr, LoCon with a Tucker core and DoRA reach `generate` this way: peft's layers cannot hold every
per-layer structure such files carry (LoKr's factor split varies per layer and its scale is 1 where no factor
is split; DoRA's magnitude may scale input features), and peft's DoRA at a weight below 1 scales only the
low-rank part, so `<lora:x:0>` would not give the base image. Merging W + s·ΔW (formats/lycoris.py) is exact
at every weight, costs nothing per step, and is safe because `generate` and each web-UI job work on their own
copy of the model. Several files merge in prompt order, each onto the weights the previous ones left, as
both web UIs do (only DoRA depends on that order).
"""

from __future__ import annotations

import torch

from .errors import SdtuneError
from .formats.lora import group_modules
from .formats.lycoris import fits, merged_weight


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer that owns the weight (peft wraps layers it injected into)."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def merge_into_model(model, state: dict[str, torch.Tensor], weight: float, name: str) -> int:
    """Add the canonical `state`'s updates at `weight` into `model`'s layers; return how many layers changed.
    Every layer is checked before any weight changes, so a misfit leaves the model as it was."""
    components = model.components()
    layers: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    for (component, path), params in group_modules(state, f"LoRA '{name}'").items():
        if component not in components:
            raise SdtuneError(f"LoRA '{name}' has weights for {component}, which this model does not have; "
                              "it was made for another model family.")
        layer = _base_layer(dict(components[component].named_modules()).get(path, torch.nn.Identity()))
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not fits(params, tuple(layer.weight.shape)):
            raise SdtuneError(f"LoRA '{name}' does not fit this model (layer {component}.{path} is missing or has "
                              "another width); it was made for another model family or size.")
        layers.append((layer, params))
    if weight == 0:
        return 0  # the base weights exactly, whatever the update holds
    with torch.no_grad():
        for layer, params in layers:
            layer.weight.copy_(merged_weight(layer.weight, params, weight))
    return len(layers)
