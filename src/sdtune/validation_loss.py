"""The validation loss: the denoising loss on held-out images at noise and timesteps fixed for the whole run,
read at intervals (kohya's deterministic validation loss, OneTrainer's validation). The training loss is
drawn at fresh noise and timesteps every step and mostly measures them; this one changes only when the
weights do, so a validation loss that rises while the training loss falls shows over-training.
"""

from __future__ import annotations

import torch

from . import conditioning
from .conditioning import Conditioning
from .config import DataConfig, TrainConfig
from .data import SubjectDataset, load_image_folder
from .loss import per_sample_mse, training_target

# Each image is noised at these fractions of the training timestep range: low and high noise both count.
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
NOISE_SEED = 1_000_003  # added to the run's seed: the held-out noise never equals a training draw
READINGS_PER_RUN = 10  # when no interval is given


class ValidationLoss:
    """Held-out images encoded once (the VAE posterior's mean: no sampling), with fixed noise per image."""

    def __init__(self, model, data_cfg: DataConfig, train_cfg: TrainConfig, noise_scheduler,
                 timestep_range: tuple[int, int], device, template: str):
        self.model, self.scheduler, self.device = model, noise_scheduler, device
        dataset = SubjectDataset(load_image_folder(data_cfg.validation_images), data_cfg.token,
                                 data_cfg.class_word, template=template, use_captions=data_cfg.use_captions,
                                 resolution=data_cfg.resolution or model.resolution, random_crop=False, flip=False,
                                 repeats=1, buckets=data_cfg.buckets, seed=train_cfg.seed)
        self.prompts = list(dataset.prompts)
        low, high = timestep_range
        self.timesteps = torch.tensor([int(low + f * (high - low)) for f in TIMESTEP_FRACTIONS], device=device)
        self.latents, self.noise = [], []
        with torch.no_grad():
            for index in range(len(dataset)):
                pixels = dataset.get(index)["pixels"].unsqueeze(0).to(device, torch.float32)
                latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
                generator = torch.Generator().manual_seed(train_cfg.seed + NOISE_SEED + index)
                self.latents.append(latents)
                self.noise.append(torch.randn((len(self.timesteps), *latents.shape[1:]), generator=generator))
        self._fixed_text = None if self._text_trains() else self._encode(self.prompts)

    def every(self, train_cfg: TrainConfig) -> int:
        """Steps between readings: the run's setting, else ten readings per run."""
        return train_cfg.validation_loss_every or max(1, train_cfg.steps // READINGS_PER_RUN)

    @torch.no_grad()
    def __call__(self, autocast) -> float:
        """The mean loss over images and fixed timesteps with the weights as they are now (dropout off)."""
        unet = self.model.unet
        was_training = unet.training
        unet.eval()
        try:
            text = self._fixed_text or self._encode(self.prompts)
            total = 0.0
            for index, latents in enumerate(self.latents):
                count = len(self.timesteps)
                batch = latents.expand(count, *latents.shape[1:])
                noise = self.noise[index].to(batch.device, batch.dtype)
                cond = Conditioning.cat([text.select(slice(index, index + 1))] * count)
                with autocast():
                    pred = unet(self.scheduler.add_noise(batch, noise, self.timesteps), self.timesteps,
                                cond.hidden_states, added_cond_kwargs=cond.added).sample
                target = training_target(self.scheduler, batch, noise, self.timesteps)
                total += per_sample_mse(pred, target).mean().item()
            return total / len(self.latents)
        finally:
            unet.train(was_training)

    def read(self, autocast, step: int, readings: list[tuple[int, float]], progress, logger) -> None:
        """Read the loss now: kept for the run card, shown as a line beside the progress, logged."""
        from .progress import note

        value = self(autocast)
        readings.append((step, value))
        note(progress, f"step {step}: validation loss {value:.4f}")
        if logger:
            logger.add_scalar("validation/loss", value, step)

    def _text_trains(self) -> bool:
        return any(p.requires_grad for encoder in self.model.text_encoders for p in encoder.parameters())

    def _encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            return conditioning.encode(self.model, prompts)


def for_run(model, data_cfg: DataConfig, train_cfg: TrainConfig, noise_scheduler, device,
            timestep_range: tuple[int, int], is_main: bool) -> ValidationLoss | None:
    """The run's validation loss on --validation-images (main process only), or None without them."""
    if not data_cfg.validation_images or not is_main:
        return None
    from .trainset import default_template

    template = data_cfg.prompt_template or default_template(model)
    return ValidationLoss(model, data_cfg, train_cfg, noise_scheduler, timestep_range, device, template)
