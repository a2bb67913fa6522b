"""The builtin model's architecture (from the recipe's config) and how it is written as a diffusers folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def build_vae(m: dict[str, Any], image_size: int):
    """AutoencoderKL with len(vae_channels) levels (downscale 2**(levels-1)) and `latent_channels` channels."""
    from diffusers import AutoencoderKL

    levels = len(m["vae_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(m["vae_channels"]),
        layers_per_block=m["vae_layers"], latent_channels=m["latent_channels"], sample_size=image_size,
        norm_num_groups=min(32, m["vae_channels"][0]),
    )


def build_text_encoder(m: dict[str, Any], tokenizer):
    """A small CLIPTextModel over the toy vocabulary (77 positions, like every SD text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=m["text_width"], intermediate_size=m["text_ff"],
        num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=m["text_width"],
    )
    return CLIPTextModel(config)


def build_unet(m: dict[str, Any], latent_size: int):
    """UNet2DConditionModel with cross-attention at every level (global facts like backgrounds need it)."""
    from diffusers import UNet2DConditionModel

    levels = len(m["unet_channels"])
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=m["latent_channels"], out_channels=m["latent_channels"],
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(m["unet_channels"]), layers_per_block=m["unet_layers"],
        cross_attention_dim=m["text_width"], attention_head_dim=m["unet_heads"],
        norm_num_groups=min(32, m["unet_channels"][0]),
    )


def scheduler_config(s: dict[str, Any]) -> dict[str, Any]:
    """Noise schedule shared by training (DDPMScheduler) and the saved inference scheduler (DDIMScheduler).

    Zero terminal SNR with v-prediction: with a 16x16 latent the mean colour survives SD's usual final noise
    level, so a model trained on it ignores the prompt's background at sampling time from pure noise.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": s["beta_schedule"],
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": s["prediction_type"],
        "rescale_betas_zero_snr": bool(s["zero_terminal_snr"]),
        "timestep_spacing": "trailing" if s["zero_terminal_snr"] else "leading",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def _atomic_dir(out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)), out


def save_pipeline(out_dir: str | Path, vae, text_encoder, unet, tokenizer_dir: str | Path,
                  sched: dict[str, Any], dtype: torch.dtype = torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder (no safety checker) atomically, weights in `dtype`.

    The text encoder's config keeps dtype float32 so a plain `from_pretrained` gives an all-fp32 pipeline
    (transformers would otherwise load it in fp16 next to an fp32 UNet and the pipeline would fail).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tmp, out = _atomic_dir(Path(out_dir))
    try:
        pipe = StableDiffusionPipeline(
            vae=_copy_as(vae, dtype), text_encoder=_copy_as(text_encoder, dtype),
            tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)), unet=_copy_as(unet, dtype),
            scheduler=DDIMScheduler.from_config(sched), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "text_encoder" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"
        cfg.pop("torch_dtype", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def replace_component(pipe_dir: str | Path, name: str, module, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite one component folder (e.g. "vae") of a pipeline folder atomically, weights in `dtype`."""
    target = Path(pipe_dir) / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    old = target.with_name(f".{name}.old")
    try:
        _copy_as(module, dtype).save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("_name_or_path", None)  # where it was loaded from is no business of the folder
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _copy_as(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy in `dtype`, leaving the training module untouched (cast tensor by tensor, which avoids
    diffusers' warning about casting models with `.to`)."""
    import copy

    clone = copy.deepcopy(module)
    for t in list(clone.parameters()) + list(clone.buffers()):
        t.data = t.data.to("cpu", dtype if t.is_floating_point() else t.dtype)
    return clone


def load_pipeline(path: str | Path, device: str = "cpu"):
    """Load a toy-world pipeline folder in fp32 with the progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
