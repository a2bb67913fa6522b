"""UNet module names in the original LDM layout <-> diffusers module paths, derived from a UNet config.

The LDM UNet (CompVis/SGM, what single-file checkpoints, kohya SDXL LoRAs and A1111 use) numbers its
blocks flatly (`input_blocks.4.1`, `middle_block.1`, `output_blocks.2.0`); diffusers nests them
(`down_blocks.1.attentions.0`). The table here maps every parameter-holding module one to one, so the
same dict serves LoRA names (module paths) and full checkpoints (module path + `.weight`/`.bias`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import SdtuneError

LDM_UNET_PREFIX = "model.diffusion_model."

# Module-level tables, diffusers suffix -> LDM suffix, inverted where needed (one table, both ways).
RESNET_SUFFIXES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
ADD_EMBEDDING: dict[str, str] = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
CLASS_EMBEDDING: dict[str, str] = {
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
# Transformer2DModel / BasicTransformerBlock leaves: same names under the block prefix in both layouts.
TRANSFORMER_OUTER = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK_LEAVES = (
    "norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "norm3", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = {"UNetMidBlock2DCrossAttn", None}


def _per_block(value: Any, n: int, name: str) -> list[int]:
    """An int-or-sequence config value spread to one int per block."""
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return list(value)
    raise SdtuneError(f"UNet config field {name}={value!r} is neither an int nor one int per block; fix the config.")


def _resnet(table: dict[str, str], ldm: str, dif: str, in_ch: int, out_ch: int) -> None:
    for dif_suffix, ldm_suffix in RESNET_SUFFIXES.items():
        if dif_suffix == "conv_shortcut" and in_ch == out_ch:
            continue
        table[f"{ldm}.{ldm_suffix}"] = f"{dif}.{dif_suffix}"


def _transformer(table: dict[str, str], ldm: str, dif: str, depth: int) -> None:
    for leaf in TRANSFORMER_OUTER:
        table[f"{ldm}.{leaf}"] = f"{dif}.{leaf}"
    for t in range(depth):
        for leaf in TRANSFORMER_BLOCK_LEAVES:
            table[f"{ldm}.transformer_blocks.{t}.{leaf}"] = f"{dif}.transformer_blocks.{t}.{leaf}"


def _check_types(config: Mapping[str, Any]) -> tuple[list[bool], list[bool]]:
    """Attention presence per down/up block; refuses block types the LDM layout does not have."""
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    for kind, types, known in (("down", down, _DOWN_TYPES), ("up", up, _UP_TYPES)):
        bad = [t for t in types if t not in known]
        if bad:
            raise SdtuneError(f"UNet {kind} block type {bad[0]!r} has no LDM-layout name table; use {sorted(known)}.")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in _MID_TYPES:
        raise SdtuneError(f"UNet mid block type {config['mid_block_type']!r} has no LDM-layout name table.")
    if len(up) != len(down):
        raise SdtuneError("UNet config has different numbers of down and up blocks; fix the config.")
    return [_DOWN_TYPES[t] for t in down], [_UP_TYPES[t] for t in up]


def ldm_to_diffusers_unet_names(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """{LDM module path: diffusers module path} for every parameter-holding module of this UNet."""
    cfg = dict(unet_config)
    down_attn, up_attn = _check_types(cfg)
    n = len(down_attn)
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = _per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    rev_depth_cfg = cfg.get("reverse_transformer_layers_per_block")
    rev_depth = list(reversed(depth)) if rev_depth_cfg is None else _per_block(rev_depth_cfg, n, "reverse_...")

    table = {ldm: dif for dif, ldm in TOP_LEVEL.items()}
    if cfg.get("addition_embed_type") == "text_time":
        table.update({ldm: dif for dif, ldm in ADD_EMBEDDING.items()})
    if cfg.get("class_embed_type") in ("timestep", "projection"):
        table.update({ldm: dif for dif, ldm in CLASS_EMBEDDING.items()})

    idx, out_ch = 1, channels[0]
    for i in range(n):  # input blocks: resnet [+ attention] per layer, then a downsampler
        in_ch, out_ch = out_ch, channels[i]
        for j in range(layers[i]):
            _resnet(table, f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch)
            if down_attn[i]:
                _transformer(table, f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", depth[i])
            idx += 1
        if i < n - 1:
            table[f"input_blocks.{idx}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            idx += 1

    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        top = channels[-1]
        _resnet(table, "middle_block.0", "mid_block.resnets.0", top, top)
        _transformer(table, "middle_block.1", "mid_block.attentions.0", depth[-1])
        _resnet(table, "middle_block.2", "mid_block.resnets.1", top, top)

    rev_ch, rev_layers = list(reversed(channels)), list(reversed(layers))
    idx, prev_out = 0, rev_ch[0]
    for i in range(n):  # output blocks: resnet [+ attention] per layer, upsampler on the last layer
        out_ch, skip_in = rev_ch[i], rev_ch[min(i + 1, n - 1)]
        count = rev_layers[i] + 1
        for j in range(count):
            res_in = (prev_out if j == 0 else out_ch) + (skip_in if j == count - 1 else out_ch)
            _resnet(table, f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", res_in, out_ch)
            if up_attn[i]:
                _transformer(table, f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", rev_depth[i])
            if j == count - 1 and i < n - 1:
                table[f"output_blocks.{idx}.{2 if up_attn[i] else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            idx += 1
        prev_out = out_ch
    return table


def diffusers_to_ldm_unet_names(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """{diffusers module path: LDM module path}: the inverse of `ldm_to_diffusers_unet_names`."""
    return {dif: ldm for ldm, dif in ldm_to_diffusers_unet_names(unet_config).items()}


def _rename_params(sd: Mapping[str, Any], table: Mapping[str, str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            raise SdtuneError(f"UNet weight {key!r} has no {what} name for this UNet config; check the model family.")
        out[f"{table[module]}.{param}"] = value
    return out


def unet_state_dict_to_ldm(
    sd: Mapping[str, Any], unet_config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX
) -> dict[str, Any]:
    """A diffusers UNet state dict renamed to the LDM single-file layout (tensors untouched)."""
    renamed = _rename_params(sd, diffusers_to_ldm_unet_names(unet_config), "LDM")
    return {prefix + k: v for k, v in renamed.items()}


def unet_state_dict_from_ldm(
    sd: Mapping[str, Any], unet_config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX
) -> dict[str, Any]:
    """The UNet part of an LDM single-file state dict renamed to diffusers keys (tensors untouched)."""
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return _rename_params(unet, ldm_to_diffusers_unet_names(unet_config), "diffusers")
