"""Pure dict-of-tensors <-> file-layout code, one module per artifact kind, plus format sniffing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import SdtuneError
from .lora import detect_lora_format

# Leading key fragments -> human-readable layout name (checked in order).
_KEY_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "Stable Diffusion checkpoint (LDM single-file layout)"),
    ("string_to_param.", "Textual Inversion (A1111)"),
    ("emb_params", "Textual Inversion (A1111 safetensors)"),
    ("clip_l", "Textual Inversion (SDXL clip_l/clip_g)"),
    ("clip_g", "Textual Inversion (SDXL clip_l/clip_g)"),
    ("conv_in.", "diffusers UNet weights"),
    ("down_blocks.", "diffusers UNet weights"),
    ("encoder.down.", "VAE weights (LDM layout)"),
    ("text_model.", "CLIP text encoder weights"),
)
_LORA_NAMES = {
    "kohya": "LoRA (kohya / A1111 / ComfyUI)",
    "diffusers": "LoRA (diffusers / PEFT)",
    "sdtune": "LoRA (sdtune)",
}


def sniff_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """A one-line name of the layout a flat tensor dict is in, from its run card or its keys."""
    keys = list(keys)
    method = (metadata or {}).get("method")
    try:
        lora = _LORA_NAMES[detect_lora_format(keys)] if keys else None
    except SdtuneError:
        lora = None
    if lora:
        return lora
    if method:
        return f"sdtune {method} artifact"
    for fragment, name in _KEY_LAYOUTS:
        if any(k.startswith(fragment) for k in keys):
            return name
    if keys and all(k.split(".", 1)[0].isdigit() for k in keys):
        return "Hypernetwork (A1111 layout)"
    if len(keys) == 1:
        return "single tensor (e.g. a Textual Inversion embedding)"
    return "unknown layout"
