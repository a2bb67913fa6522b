"""The architecture of a single-file SD checkpoint (LDM/SGM layout), read from its key names and tensor shapes.

Family, by key structure (not widths, so miniature models are told apart the same way):
  sdxl  conditioner.embedders.0.transformer.* (CLIP-L) and conditioner.embedders.1.model.* (OpenCLIP bigG)
  sd2   cond_stage_model.model.*              (OpenCLIP-H)
  sd1   cond_stage_model.transformer.*        (CLIP-L)
and the UNet's cross-attention width must equal the text encoders' (their sum for SDXL).
Shapes give every width, depth, block type and channel count. What shapes cannot tell (attention heads, the
latent sample size, activations, the VAE's latent scaling) comes from the family's published configuration:
SD1's UNet has 8 heads per block, every other attention 64-channel heads. A file whose names and shapes are
exactly those of a tiny:* model loads as that model (its heads do not follow the published rule).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .errors import SdtuneError
from .formats.checkpoint import TEXT_LAYOUTS, VAE_PREFIX, to_checkpoint
from .formats.ldm_names import LDM_UNET_PREFIX as UNET

HEAD_CHANNELS = 64
SD1_UNET_HEADS = 8
# Per family: UNet latent size, VAE pixel size, VAE latent scaling, scheduler, activation per text encoder.
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd1": dict(sample_size=64, vae_size=512, scaling_factor=0.18215, scheduler="PNDMScheduler",
                acts=("quick_gelu",)),
    "sd2": dict(sample_size=96, vae_size=768, scaling_factor=0.18215, scheduler="DDIMScheduler",
                acts=("gelu",)),
    "sdxl": dict(sample_size=128, vae_size=1024, scaling_factor=0.13025, scheduler="EulerDiscreteScheduler",
                 acts=("quick_gelu", "gelu")),
}
SD2_EPSILON_SAMPLE_SIZE = 64  # SD 2.x "base" models (epsilon) are 512-pixel models
# SD2's LDM config conditions on OpenCLIP-H's penultimate layer: a file with the whole 24-block tower
# loads 23 of them (diffusers' SD2 text encoders have 23 layers; sdtune writes the layers it has).
OPENCLIP_H_BLOCKS = 24
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def detect_family(sd: Mapping[str, torch.Tensor], name: str) -> str:
    """sd1 | sd2 | sdxl from the checkpoint's key structure; one sentence for anything else."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    if not has(UNET):
        raise SdtuneError(f"{name} is not a Stable Diffusion checkpoint: it has no UNet weights "
                          f"({UNET}*); LoRAs, embeddings and hypernetworks are used in prompts, not as --model.")
    if not has(VAE_PREFIX):
        raise SdtuneError(f"{name} has no VAE weights ({VAE_PREFIX}*); sdtune loads complete checkpoints only.")
    found = [family for family, layouts in TEXT_LAYOUTS.items() if all(has(prefix) for _, prefix, _ in layouts)]
    if "sdxl" in found:
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise SdtuneError(f"{name} has a single OpenCLIP text encoder under conditioner.embedders.0 (an SDXL "
                          "refiner, or SD 2.x in the SGM layout), which sdtune does not load; use a base model.")
    if len(found) != 1:
        raise SdtuneError(f"{name} has no text encoder sdtune knows (cond_stage_model.transformer.* for SD 1.x, "
                          "cond_stage_model.model.* for SD 2.x, conditioner.embedders.* for SDXL).")
    return found[0]


def _under(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    found = {m[1] for k in keys if (m := re.match(pattern, k))}
    return len(found)


def _text_config(sd: Mapping[str, torch.Tensor], prefix: str, layout: str, act: str, family: str) -> dict:
    """CLIPTextConfig kwargs of one text encoder, from its weights' shapes."""
    part = _under(sd, prefix)
    if layout == "hf":
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
        vocab, hidden = part["embeddings.token_embedding.weight"].shape
        positions = part["embeddings.position_embedding.weight"].shape[0]
        layers = _count(part, r"encoder\.layers\.(\d+)\.")
        inner = part["encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = part["text_projection.weight"].shape[0] if "text_projection.weight" in part else hidden
    else:
        vocab, hidden = part["token_embedding.weight"].shape
        positions = part["positional_embedding"].shape[0]
        layers = _count(part, r"transformer\.resblocks\.(\d+)\.")
        inner = part["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = part["text_projection"].shape[1] if "text_projection" in part else hidden
        if family == "sd2" and layers == OPENCLIP_H_BLOCKS:
            layers -= 1
    return dict(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(inner),
                num_hidden_layers=layers, num_attention_heads=max(1, int(hidden) // HEAD_CHANNELS),
                max_position_embeddings=int(positions), hidden_act=act, projection_dim=int(projection))


def _unet_levels(keys: set[str], side: str) -> list[list[str]]:
    """The block indices of input (or output) blocks grouped by resolution level, in file order."""
    blocks = sorted({int(m[2]) for k in keys if (m := _BLOCK.match(k)) and m[1] == side})
    levels: list[list[str]] = [[]]
    for i in blocks:
        if side == "input_blocks" and i == 0:
            continue  # conv_in
        block = f"{side}.{i}"
        if side == "input_blocks" and f"{block}.0.op.weight" in keys:
            levels.append([])  # a downsampler closes the level
            continue
        levels[-1].append(block)
        if side == "output_blocks" and {f"{block}.1.conv.weight", f"{block}.2.conv.weight"} & keys:
            levels.append([])  # an upsampler (after the resnet, or after resnet and attention) closes the level
    return [level for level in levels if level]


def _depth(keys: set[str], block: str) -> int:
    """Transformer blocks in the attention at `block`.1 (0: no attention)."""
    return _count(keys, rf"{re.escape(block)}\.1\.transformer_blocks\.(\d+)\.")


def _unet_config(sd: Mapping[str, torch.Tensor], family: str) -> dict:
    part = _under(sd, UNET)
    keys = set(part)
    down, up = _unet_levels(keys, "input_blocks"), _unet_levels(keys, "output_blocks")
    if not down or len(down) != len(up):
        raise SdtuneError("The checkpoint's UNet has a block structure sdtune cannot read (input and output "
                          "levels differ); it is not a Stable Diffusion 1.x/2.x/XL UNet.")
    channels = [int(part[f"{level[0]}.0.in_layers.2.weight"].shape[0]) for level in down]
    layers = [len(level) for level in down]
    down_depth = [_depth(keys, level[0]) for level in down]
    up_depth = [_depth(keys, level[0]) for level in up]
    mid_depth = _depth(keys, "middle_block") if "middle_block.1.proj_in.weight" in keys else 0
    # The mid block takes the last level's depth in diffusers' config; levels without attention use 1.
    depth = [d or 1 for d in down_depth[:-1]] + [down_depth[-1] or mid_depth or 1]
    attn = next((k for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    if attn is None:
        raise SdtuneError("The checkpoint's UNet has no cross-attention; it is not a text-to-image SD model.")
    proj_in = part[attn.split(".transformer_blocks.")[0] + ".proj_in.weight"]
    config = dict(
        in_channels=int(part["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(part["out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        cross_attention_dim=int(part[attn].shape[1]),
        use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=SD1_UNET_HEADS if family == "sd1" else [max(1, c // HEAD_CHANNELS) for c in channels],
        sample_size=FAMILY_DEFAULTS[family]["sample_size"],
    )
    if any(d and d != mirrored for d, mirrored in zip(up_depth, reversed(depth))):
        config["reverse_transformer_layers_per_block"] = [d or 1 for d in up_depth]
    if family == "sd2":
        config["upcast_attention"] = True  # SD 2.1's attention overflows in fp16 otherwise
    if "label_emb.0.0.weight" in part:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = int(part["label_emb.0.0.weight"].shape[1])
    return config


def _vae_config(sd: Mapping[str, torch.Tensor], family: str) -> dict:
    part = _under(sd, VAE_PREFIX)
    levels = _count(part, r"encoder\.down\.(\d+)\.")
    channels = [int(part[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    defaults = FAMILY_DEFAULTS[family]
    return dict(in_channels=int(part["encoder.conv_in.weight"].shape[1]),
                out_channels=int(part["decoder.conv_out.weight"].shape[0]),
                latent_channels=int(part["decoder.conv_in.weight"].shape[1]),
                block_out_channels=channels, layers_per_block=_count(part, r"encoder\.down\.0\.block\.(\d+)\."),
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                sample_size=defaults["vae_size"], scaling_factor=defaults["scaling_factor"])


def infer_architecture(sd: Mapping[str, torch.Tensor], family: str) -> dict:
    """An architecture dict (as model_configs.ARCHITECTURES holds) for this checkpoint; prediction_type is
    decided elsewhere (see single_file)."""
    defaults = FAMILY_DEFAULTS[family]
    text = [_text_config(sd, prefix, layout, act, family)
            for (_, prefix, layout), act in zip(TEXT_LAYOUTS[family], defaults["acts"])]
    unet = _unet_config(sd, family)
    widths = [t["hidden_size"] for t in text]
    if unet["cross_attention_dim"] != sum(widths):
        raise SdtuneError(f"The checkpoint's UNet attends to {unet['cross_attention_dim']}-wide text but its text "
                          f"encoders give {'+'.join(map(str, widths))}; the file mixes parts of different models.")
    if "addition_embed_type" in unet:  # SDXL: 6 size/crop numbers embedded, plus the pooled projection
        pooled = text[-1]["projection_dim"]
        unet["addition_time_embed_dim"] = (unet["projection_class_embeddings_input_dim"] - pooled) // 6
    return dict(family=family, scheduler=defaults["scheduler"], unet=unet, vae=_vae_config(sd, family), text=text)


def matching_tiny(sd: Mapping[str, torch.Tensor], family: str) -> str | None:
    """The tiny:* architecture whose every weight name and shape the file has exactly, if one."""
    from .model import build_from_config

    spec = f"tiny:{family}"
    reference = to_checkpoint(build_from_config(spec, device="meta"))
    weights = {k: v for k, v in sd.items() if k.startswith((UNET, VAE_PREFIX, "cond_stage_model.", "conditioner."))}
    if weights.keys() == reference.keys() and all(weights[k].shape == reference[k].shape for k in reference):
        return spec
    return None
