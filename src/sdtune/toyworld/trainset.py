"""The pretraining set held on the training device: rendered images, their attributes and caption tokens.

Everything a training step needs is a tensor on the device, and a step's batch (images or latents, captions
with optional parts dropped, empty captions for guidance) is drawn with one seeded generator per step, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune.toyworld import ckpt as ck
from sdtune.toyworld.captions import EMPTY_INDEX, all_captions, caption_index
from sdtune.toyworld.world import render_batch, sample_scenes


@dataclass
class TrainSet:
    """Images (uint8 [N,3,H,W]), attributes (long [N] each) and the tokenized caption table [C,77]."""

    images: torch.Tensor | None  # None when only the latents were loaded (a resumed UNet phase)
    attrs: dict[str, torch.Tensor]
    caption_ids: torch.Tensor
    latents: torch.Tensor | None = None  # scaled latents (fp16) once the VAE is trained

    def __len__(self) -> int:
        return self.attrs["shape"].shape[0]


def build_trainset(cfg: dict[str, Any], tokenizer, device: torch.device, log=print) -> TrainSet:
    """Render cfg['n_images'] seeded scenes on `device` and tokenize every caption of the grammar once."""
    t0 = time.monotonic()
    held_out = "exclude" if cfg.get("hold_out_combinations") else "any"
    scenes = sample_scenes(cfg["n_images"], seed=cfg["seed"], held_out=held_out)
    images = render_batch(scenes, cfg["image_size"], device=device, chunk=cfg["render_chunk"])
    attrs = {k: torch.as_tensor(getattr(scenes, k), device=device, dtype=torch.long)
             for k in ("shape", "colour", "size", "position", "background")}
    ids = tokenizer(all_captions(), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    if device.type == "cuda":
        torch.cuda.synchronize()
    log(f"[data] rendered {len(images)} images of {cfg['image_size']} px and tokenized {len(ids)} captions "
        f"in {time.monotonic() - t0:.1f}s")
    return TrainSet(images, attrs, ids.to(device))


def step_generator(device: torch.device, seed: int, phase: int, step: int) -> torch.Generator:
    """The one random stream of a training step (same batches after a resume)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + phase * 10_007_383 + step)


def sample_captions(data: TrainSet, idx: torch.Tensor, g: torch.Generator, caps: dict[str, Any]) -> torch.Tensor:
    """Token ids [B,77] for the scenes `idx`, each optional part kept with its probability."""
    n, dev = idx.shape[0], idx.device
    r = torch.rand((5, n), generator=g, device=dev)
    keep = caps["keep"]
    pick = lambda k, row: torch.where(r[row] < keep[k], data.attrs[k][idx], -1)  # noqa: E731
    cap = caption_index(data.attrs["shape"][idx], pick("colour", 0), pick("size", 1), pick("position", 2),
                        pick("background", 3))
    cap = torch.where(r[4] < caps["p_empty"], EMPTY_INDEX, cap)
    return data.caption_ids[cap]


def images_as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, data: TrainSet, chunk: int, log=print) -> float:
    """Encode every image once (posterior mode), set data.latents scaled to unit std; returns the scale."""
    t0 = time.monotonic()
    vae.eval()
    parts = [vae.encode(images_as_float(data.images[i:i + chunk])).latent_dist.mode()
             for i in range(0, len(data), chunk)]
    lat = torch.cat(parts)
    scale = float(1.0 / lat.float().std())
    data.latents = (lat * scale).half()
    mean = lat.float().mean(dim=(0, 2, 3)) * scale
    log(f"[latents] {tuple(lat.shape)} scaling_factor {scale:.4f} channel means "
        f"{[round(float(m), 3) for m in mean]} in {time.monotonic() - t0:.1f}s")
    return scale


def latents_key(cfg: dict[str, Any], vae_half: dict[str, torch.Tensor]) -> str:
    """What the latents depend on: the recipe (scenes, captions) and the VAE's saved weights."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(vae_half):
        digest.update(name.encode())
        digest.update(vae_half[name].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_latents(path: Path, data: TrainSet, key: str, scale: float) -> None:
    """Keep the UNet phase's inputs on disk, so a resumed chunk skips rendering and encoding (minutes on a
    CPU). Written like the checkpoint beside it, so a cut-off never leaves half a file."""
    attrs = {k: v.cpu() for k, v in data.attrs.items()}
    ck.save_checkpoint(path, {"key": key, "scale": scale, "latents": data.latents.cpu(),
                              "caption_ids": data.caption_ids.cpu(), "attrs": attrs})


def load_latents(path: Path, key: str, device: torch.device) -> tuple[TrainSet, float] | None:
    """(latents-only TrainSet, scaling factor) saved by save_latents for this key, or None."""
    if not path.is_file():
        return None
    saved = ck.load_checkpoint(path)
    if saved.get("key") != key:
        return None
    to = lambda t: t.to(device)  # noqa: E731
    data = TrainSet(None, {k: to(v) for k, v in saved["attrs"].items()}, to(saved["caption_ids"]), to(saved["latents"]))
    return data, float(saved["scale"])
