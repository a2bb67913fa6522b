"""LoRA for any PyTorch model, with loralib's API (the one people know from LLM work).

    import sdtune.loralib as lora
    layer = lora.Linear(768, 768, r=16)          # also lora.Embedding, lora.Conv2d
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    torch.save(lora.lora_state_dict(model), "adapter.pt")
    model.load_state_dict(pretrained, strict=False); model.load_state_dict(adapter, strict=False)

The layers are nn.Linear / nn.Embedding / nn.Conv2d subclasses, so a pretrained model's state dict
loads into them unchanged and the adapter holds only `lora_A` / `lora_B` (+ chosen biases). peft's layer
wrappers rename the base weight (`base_layer.weight`), which breaks exactly that contract, hence these
small classes. eval() merges the update into the weight for speed; train() restores the exact
pre-merge weight (kept aside while merged, so merging never drifts the base weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BIAS_MODES = ("none", "all", "lora_only")


class _LoRAMixin:
    """Shared state: rank, scaling, dropout and the merge bookkeeping."""

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        if r < 0:
            raise ValueError(f"LoRA rank r must be >= 0, got {r}")
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merge_weights, self.merged = merge_weights, False
        self._unmerged_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - defined by each layer
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        if self.r > 0 and self.merge_weights:
            if mode and self.merged:
                self.weight.data = self._unmerged_weight
                self._unmerged_weight, self.merged = None, False
            elif not mode and not self.merged:
                self._unmerged_weight = self.weight.data
                self.weight.data = self.weight.data + self.delta_weight().to(self.weight.dtype)
                self.merged = True
        return self


class Linear(_LoRAMixin, nn.Linear):
    """nn.Linear plus a trainable low-rank update B @ A scaled by lora_alpha / r."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1.0,
                 lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: the layer starts as the base

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.r > 0 and not self.merged:
            out = out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return out


class Embedding(_LoRAMixin, nn.Embedding):
    """nn.Embedding plus a low-rank update of the table (no dropout on integer inputs)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1.0,
                 merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
            nn.init.normal_(self.lora_B)  # A = 0 here, as loralib does for embeddings

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            after_a = F.embedding(x, self.lora_A.T, self.padding_idx, self.max_norm, self.norm_type,
                                  self.scale_grad_by_freq, self.sparse)
            out = out + (after_a @ self.lora_B.T) * self.scaling
        return out


class Conv2d(_LoRAMixin, nn.Conv2d):
    """nn.Conv2d plus a low-rank update of its kernel, factored as loralib's ConvLoRA does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, r: int = 0,
                 lora_alpha: float = 1.0, lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            k = self.kernel_size[0]
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * k, in_channels // self.groups * k)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_channels * k, r * k)))
            self.weight.requires_grad = False
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:  # convolution is linear in the kernel: base + update
            return self._conv_forward(x, self.weight, self.bias) + \
                self._conv_forward(self.lora_dropout(x), self.delta_weight(), None)
        return self._conv_forward(x, self.weight, self.bias)


LORA_LAYERS = (Linear, Embedding, Conv2d)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but LoRA factors; bias="all" also trains every bias, "lora_only" those of LoRA layers."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name.rsplit(".", 1)[-1]
    for module in model.modules():
        if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            if bias == "all" or (bias == "lora_only" and isinstance(module, LORA_LAYERS) and module.r > 0):
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """Only the LoRA factors (and the biases `bias` selects), ready for load_state_dict(strict=False)."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    keep = {f"{name}.bias" for name, m in model.named_modules()
            if getattr(m, "bias", None) is not None
            and (bias == "all" or (bias == "lora_only" and isinstance(m, LORA_LAYERS) and m.r > 0))}
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or k in keep}
