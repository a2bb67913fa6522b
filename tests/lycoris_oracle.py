"""The LyCORIS package as the oracle for what a LoCon/LoHa/LoKr/DoRA file means: networks built with LyCORIS's own
kohya network code on tiny models, randomised so every layer changes, saved in LyCORIS's kohya layout, and
applied with LyCORIS's own forward."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

# LyCORIS's default preset also names block classes of other architectures (a TimestepEmbedding among them, which
# clashes with its own time_embedding names on a diffusers UNet): the SD blocks kohya's LyCORIS training targets.
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def kohya_text_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """The encoder as kohya names it: transformers >= 5 flattens CLIPTextModel, files keep `text_model.`."""
    return encoder if hasattr(encoder, "text_model") else torch.nn.ModuleDict({"text_model": encoder})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every LyCORIS parameter random (LyCORIS starts at a zero update); DoRA magnitudes moved off ||W||."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("dora_scale"):
                param.mul_(1 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)


def network(unet, text_encoders: list, folder: Path, algo: str, seed: int = 0, **kwargs):
    """A LyCORIS kohya network on these models, applied (LyCORIS's forward runs) and randomised."""
    from lycoris.kohya import create_network

    preset = folder / "sd-preset.toml"
    preset.write_text(PRESET)
    encoders = [kohya_text_encoder(e) for e in text_encoders]
    encoder = encoders if len(encoders) > 1 else encoders[0]
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net = create_network(1.0, 4, 2.0, None, encoder, unet, preset=str(preset), algo=algo, conv_dim=2, conv_alpha=1.0,
                         **kwargs)
    net.apply_to(encoder, unet, True, True)
    randomise(net, seed)
    return net


def save(net, path: Path) -> Path:
    """The network in LyCORIS's kohya layout (what LyCORIS's kohya training writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, {})
    return path


def from_file(unet, text_encoders: list, weights: dict[str, torch.Tensor]):
    """LyCORIS's own modules built from a kohya-layout state (as its create_network_from_weights builds them for
    kohya's scripts) and applied: its forward adds each layer's update to the weight it runs with. (Its merge_to
    is not used: LyCORIS 4.1.3 scales a merged LoHa/LoKr update by alpha/dim twice, while its forward, its
    training and the web UIs scale it once.)"""
    import tomllib

    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    LycorisNetworkKohya.apply_preset(tomllib.loads(PRESET))  # its constructor first wraps the preset's layers
    encoders = [kohya_text_encoder(e) for e in text_encoders]
    encoder = encoders if len(encoders) > 1 else encoders[0]
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net, _ = create_network_from_weights(1.0, None, None, encoder, unet, weights_sd=weights)
    net.apply_to(encoder, unet, True, True)
    return net


def detach(net) -> None:
    """Give the models their own forward back."""
    for module in net.loras:
        module.restore()
