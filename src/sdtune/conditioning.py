"""Text (and SDXL size) conditioning for the UNet, computed exactly as diffusers' pipelines compute it.

Training must condition the UNet the way generation will, or a trained artifact drifts at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """What the UNet receives besides the noisy latents."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds + time_ids

    def select(self, rows: torch.Tensor | slice) -> "Conditioning":
        added = {k: v[rows] for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden_states[rows], added)

    def to(self, device, dtype=None) -> "Conditioning":
        added = {k: v.to(device, dtype) for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden_states.to(device, dtype), added)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.hidden_states for p in parts]), added)


def token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Pad/truncate to the tokenizer's 77-token window, as the pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode(model, prompts: list[str], resolution: int | None = None) -> Conditioning:
    """Encode prompts for the UNet; gradients flow when the text encoder has trainable parameters."""
    device = model.text_encoder.device
    if model.family != "sdxl":
        ids = token_ids(model.tokenizer, prompts, device)
        return Conditioning(model.text_encoder(ids)[0])
    # SDXL: penultimate hidden states of both encoders side by side, pooled output of the second.
    states, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    size = resolution or model.resolution
    # Micro-conditioning: original size, crop top-left, target size (square, uncropped training images).
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=pooled.dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
    return Conditioning(torch.cat(states, dim=-1), added)
