"""Diffusion training loss pieces as pure functions: noise, timesteps, targets and per-sample weights.

Noise and timesteps come from a generator seeded by (seed, sample position), so a sample gets the same
noise however the global batch is split across micro-batches or processes, and after a resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed unique to (run seed, global sample position)."""
    return (seed * 1_000_003 + position * 7_919 + 0x5D7) % (2**63 - 1)


def draw_noise(latent_shape: tuple[int, ...], positions: list[int], seed: int, num_timesteps: int,
               offset_noise: float = 0.0, timestep_range: tuple[int, int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise [B, *latent_shape] and timesteps [B] (uniform in timestep_range, lowest included,
    highest not; default all num_timesteps), on the CPU (move them to the device after)."""
    low, high = timestep_range or (0, num_timesteps)
    noises, timesteps = [], []
    for position in positions:
        gen = torch.Generator().manual_seed(sample_seed(seed, position))
        noise = torch.randn(latent_shape, generator=gen)
        if offset_noise:
            # Offset noise: a per-channel constant shift, so the model learns to change mean brightness.
            noise = noise + offset_noise * torch.randn((latent_shape[0], 1, 1), generator=gen)
        noises.append(noise)
        timesteps.append(torch.randint(low, high, (1,), generator=gen))
    return torch.stack(noises), torch.cat(timesteps)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction type {kind!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023); for v-prediction the SNR+1 denominator applies."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.minimum(ratio, torch.full_like(ratio, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped / ratio


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def combine(losses: torch.Tensor, is_class: torch.Tensor, prior_weight: float, n_instance: int,
            n_class: int) -> torch.Tensor:
    """This micro-batch's share of: mean instance loss + prior_weight * mean class loss over a batch of
    n_instance (n_class) examples.

    Dividing sums by the whole batch's counts (a process's share of the global batch) makes the summed
    gradients of its micro-batches the gradient of its share; processes then average theirs.
    """
    # torch.where rather than boolean indexing, which would make the host wait for the GPU every step.
    zero = torch.zeros_like(losses)
    total = torch.where(is_class, zero, losses).sum() / max(n_instance, 1)
    if n_class:
        total = total + prior_weight * torch.where(is_class, losses, zero).sum() / n_class
    return total
