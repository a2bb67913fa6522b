"""What the training loop optimises and how: the method's parameters as param groups with their own rates,
AdamW (fused, or 8-bit on request) with its learning-rate schedule, groups that stop early, and the EMA."""

from __future__ import annotations

import torch

from . import speed
from .config import TrainConfig
from .errors import SdtuneError


def as_param_groups(trainable) -> list[dict]:
    """Methods return parameters or optimizer param groups; the loop always works with groups."""
    trainable = list(trainable)
    if trainable and isinstance(trainable[0], dict):
        return trainable
    return [{"params": trainable}]


def freeze_finished_groups(stops: list[tuple[int, list]], step: int) -> None:
    """Param groups past their `stop_after` step train no more: no gradient, so the optimizer skips them."""
    for stop_after, group_params in stops:
        if step >= stop_after:
            for param in group_params:
                param.requires_grad_(False)
                param.grad = None


def ema(params: list, decay: float, start_step: int):
    """diffusers' EMA of the trained weights (its decay warms up from 0), or None when disabled."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=decay)
    ema.optimization_step = start_step  # a resumed run continues the warm-up where it was
    return ema


def group_with_lr(group: dict, base_lr: float, lr_scale: float) -> dict:
    """A group's own lr ("lr", else the base lr, times "lr_factor") scaled like the base lr."""
    group = dict(group)
    factor = group.pop("lr_factor", 1.0)
    if "lr" in group or factor != 1.0:
        group["lr"] = group.get("lr", base_lr) * factor * lr_scale
    return group


def make_optimizer(param_groups: list[dict], lr_scale: float, cfg: TrainConfig, device):
    """AdamW (8-bit on request) over the groups; a group's own lr is scaled like the base lr."""
    from diffusers.optimization import get_scheduler

    if not any(group["params"] for group in param_groups):
        raise SdtuneError("The method has nothing to train; check its settings.")
    param_groups = [group_with_lr(group, cfg.lr, lr_scale) for group in param_groups]
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        if device.type != "cuda":
            raise SdtuneError("use_8bit_adam needs a CUDA device; drop it on this machine.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SdtuneError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from None
        optimizer_cls = bnb.optim.AdamW8bit
    options = {} if cfg.use_8bit_adam else speed.adam_options(cfg.adam_impl, device.type)  # fused / foreach
    optimizer = optimizer_cls(param_groups, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay, **options)
    schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.steps)
    return optimizer, schedule
