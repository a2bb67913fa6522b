"""Whole-model single-file checkpoints in the original (LDM/SGM) key layout, written and read.

This is the file A1111, ComfyUI and diffusers' `from_single_file` load. Per family:
  UNet   model.diffusion_model.*                          (names from ldm_names, all families)
  VAE    first_stage_model.*                              (encoder.down.N.block.M..., mid.attn_1.q...)
  sd1    cond_stage_model.transformer.text_model.*        (HF CLIP layout)
  sd2    cond_stage_model.model.*                         (OpenCLIP: transformer.resblocks.N, fused in_proj)
  sdxl   conditioner.embedders.0.transformer.text_model.* (HF CLIP-L) and
         conditioner.embedders.1.model.*                  (OpenCLIP bigG, with text_projection)
The name tables are built from the live model's configs and keys, and the same tables read and write;
tensors pass through untouched except for the three shape differences between the layouts: the VAE's
attention projections (linear <-> 1x1 conv), OpenCLIP's fused q/k/v (`in_proj`) and its transposed
`text_projection`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import SdtuneError
from .ldm_names import LDM_UNET_PREFIX, unet_state_dict_from_ldm, unet_state_dict_to_ldm

VAE_PREFIX = "first_stage_model."
# Family -> (component, key prefix in the file, text-encoder layout).
TEXT_LAYOUTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", "hf"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "openclip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
}
# VAE module names, diffusers -> LDM (top level, inside a resnet, inside the mid attention).
VAE_TOP: dict[str, str] = {
    "encoder.conv_in": "encoder.conv_in", "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
}  # fmt: skip
VAE_RESNET: dict[str, str] = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION: dict[str, str] = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_CONV_1X1 = ("q", "k", "v", "proj_out")  # linear in diffusers, 1x1 conv in LDM
# HF CLIP text-encoder names -> OpenCLIP names: whole keys, then modules inside layer N.
HF_CLIP_ROOT = "text_model."
OPENCLIP_TOP: dict[str, str] = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",  # transposed: OpenCLIP computes x @ text_projection
}
OPENCLIP_LAYER: dict[str, str] = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                                  "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fused into attn.in_proj_*
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")  # in_proj_weight
# Keys real checkpoints carry that no diffusers component holds (EMA copies, schedule buffers, unused heads).
_UNUSED_TEXT_KEYS = ("logit_scale", "attn_mask", "text_model.embeddings.position_ids", "text_projection")


def vae_module_names(vae_config: Mapping) -> dict[str, str]:
    """{diffusers VAE module path: LDM module path} for this VAE's depth and layers per block."""
    n, layers = len(vae_config["block_out_channels"]), int(vae_config["layers_per_block"])
    table = dict(VAE_TOP)

    def resnet(dif: str, ldm: str) -> None:
        table.update({f"{dif}.{d}": f"{ldm}.{l}" for d, l in VAE_RESNET.items()})

    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        for j in range(layers + 1):  # the decoder's blocks run in reverse order and have one more resnet
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}")
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        table.update({f"{side}.mid_block.attentions.0.{d}": f"{side}.mid.attn_1.{l}" for d, l in VAE_ATTENTION.items()})
    return table


def _rename_modules(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            raise SdtuneError(f"{what} weight {key!r} has no counterpart in the other layout; check the model family.")
        out[f"{table[module]}.{param}"] = value
    return out


def vae_to_ldm(sd: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the LDM layout (attention projections become 1x1 convs)."""
    out = _rename_modules(sd, vae_module_names(vae_config), "VAE")
    return {k: v[..., None, None] if _is_vae_conv_1x1(k) and v.ndim == 2 else v for k, v in out.items()}


def vae_from_ldm(sd: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """An LDM VAE state dict (no prefix) in diffusers names (1x1 attention convs become linear)."""
    table = {ldm: dif for dif, ldm in vae_module_names(vae_config).items()}
    squeezed = {k: v[:, :, 0, 0] if _is_vae_conv_1x1(k) and v.ndim == 4 else v for k, v in sd.items()}
    return _rename_modules(squeezed, table, "VAE")


def _is_vae_conv_1x1(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.rsplit(".", 2)[-2] in _VAE_CONV_1X1


def hf_clip_key(key: str) -> str:
    """A CLIP text-encoder key as files spell it (transformers >= 5 drops the `text_model.` level)."""
    return key if key.startswith((HF_CLIP_ROOT, "text_projection", "logit_scale")) else HF_CLIP_ROOT + key


def openclip_from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text-encoder weights -> OpenCLIP names (q/k/v fused into in_proj, projection transposed)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in ((hf_clip_key(k), v) for k, v in sd.items()):
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        match = _HF_LAYER.match(key)
        if not match or (match[2] not in OPENCLIP_LAYER and match[2] not in OPENCLIP_QKV):
            raise SdtuneError(f"Text-encoder weight {key!r} has no OpenCLIP name; check the model family.")
        layer, module, param = match.groups()
        if module in OPENCLIP_QKV:
            fused.setdefault((layer, param), {})[module] = value
        else:
            out[f"transformer.resblocks.{layer}.{OPENCLIP_LAYER[module]}.{param}"] = value
    for (layer, param), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[m] for m in OPENCLIP_QKV])
    return out


def hf_from_openclip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-encoder weights -> HF CLIP names (with `text_model.`); the inverse of openclip_from_hf."""
    top = {ldm: dif for dif, ldm in OPENCLIP_TOP.items()}
    layer_names = {ldm: dif for dif, ldm in OPENCLIP_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value.T.contiguous() if key == "text_projection" else value
            continue
        match = _OPENCLIP_LAYER.match(key)
        layer, module, param = match.groups() if match else ("", "", "")
        if module == "attn.in_proj":
            for name, part in zip(OPENCLIP_QKV, value.chunk(3)):
                out[f"text_model.encoder.layers.{layer}.{name}.{param}"] = part.contiguous()
        elif module in layer_names:
            out[f"text_model.encoder.layers.{layer}.{layer_names[module]}.{param}"] = value
        elif key.rsplit(".", 1)[-1] not in _UNUSED_TEXT_KEYS:
            raise SdtuneError(f"Text-encoder weight {key!r} is not an OpenCLIP name sdtune knows.")
    return out


def to_checkpoint(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model as one LDM-layout state dict (floating tensors cast to `dtype` when given)."""
    layouts = TEXT_LAYOUTS.get(model.family)
    if layouts is None:
        raise SdtuneError(f"No single-file layout for model family {model.family!r}.")
    sd = unet_state_dict_to_ldm(model.unet.state_dict(), model.unet.config)
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(model.vae.state_dict(), model.vae.config).items()})
    components = model.components()
    for component, prefix, layout in layouts:
        weights = components[component].state_dict()
        named = openclip_from_hf(weights) if layout == "openclip" else {hf_clip_key(k): v for k, v in weights.items()}
        sd.update({prefix + k: v for k, v in named.items()})
    return {k: _cast(v, dtype) for k, v in sd.items()}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach() if t.is_meta else t.detach().to("cpu")  # meta tensors stay shapes (sizing without memory)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def from_checkpoint(sd: Mapping[str, torch.Tensor], model) -> dict[str, dict[str, torch.Tensor]]:
    """An LDM-layout state dict -> {component: state dict named as `model`'s live modules}; keys outside
    the known prefixes (EMA copies, schedule buffers) are ignored, missing weights are refused."""
    components = model.components()
    out = {"unet": unet_state_dict_from_ldm(sd, model.unet.config, LDM_UNET_PREFIX),
           "vae": vae_from_ldm(_under(sd, VAE_PREFIX), model.vae.config)}
    for component, prefix, layout in TEXT_LAYOUTS[model.family]:
        part = _under(sd, prefix)
        named = hf_from_openclip(part) if layout == "openclip" else part
        out[component] = _live_names(named, components[component].state_dict().keys())
    for component, weights in out.items():
        missing = sorted(set(components[component].state_dict()) - set(weights))
        if missing:
            raise SdtuneError(f"The checkpoint lacks {component} weight {missing[0]!r}; it was made for another "
                              "model family or size.")
    return out


def _under(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _live_names(sd: Mapping[str, torch.Tensor], live_keys) -> dict[str, torch.Tensor]:
    """File-spelled CLIP keys -> the live module's spelling; unused extras (position_ids, a projection the
    model lacks, layers beyond its depth as in SD2's 24-block OpenCLIP) are dropped."""
    live = set(live_keys)
    out = {}
    for key, value in sd.items():
        name = key if key in live else key.removeprefix(HF_CLIP_ROOT)
        if name in live:
            out[name] = value
    return out


def load_checkpoint(model, sd: Mapping[str, torch.Tensor]) -> None:
    """Put an LDM-layout checkpoint's weights into `model` (same architecture), keeping each module's dtype."""
    components = model.components()
    for component, weights in from_checkpoint(sd, model).items():
        unexpected = components[component].load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise SdtuneError(f"Checkpoint weight {component}.{unexpected[0]} does not fit this model.")


def save_checkpoint(model, path: str | Path, metadata: Mapping[str, str], dtype: torch.dtype | None = None) -> Path:
    """Write the model as one LDM-layout .safetensors file, atomically, with `metadata` in its header."""
    from ..artifacts import save_artifact

    meta = {**metadata, "modelspec.architecture": modelspec_architecture(model)}
    return save_artifact(path, to_checkpoint(model, dtype), meta)


def modelspec_architecture(model) -> str:
    """Stability's model-spec architecture name, which checkpoint browsers and converters read."""
    if model.family == "sd2":
        return "stable-diffusion-v2-768-v" if model.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[model.family]
