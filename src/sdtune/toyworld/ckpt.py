"""The recipe's rolling checkpoint: fp16 weights plus a compact AdamW state, written atomically.

Adam moments are stored blockwise in 8 bits (first moment linear in the block's absmax, second moment
log-scaled over the block's range) so a checkpoint of ~5M trainable parameters stays near 20 MB; the
in-memory optimizer keeps full precision and a resumed run continues from a close approximation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

BLOCK = 256
LOG_RANGE = 40.0  # second moments more than 2**40 below the block's largest are floored


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().float().flatten()
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def quantize_signed(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes scaled by each block's absolute maximum."""
    b = _blocks(x)
    scale = b.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    codes = torch.round(b / scale * 127).to(torch.int8)
    return {"codes": codes.cpu(), "scale": scale.cpu()}


def dequantize_signed(q: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_signed, shaped like `like`."""
    flat = (q["codes"].float() / 127 * q["scale"]).flatten()[: like.numel()]
    return flat.view_as(like).to(like.device, like.dtype)


def quantize_positive(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 codes of log2(x) spread over each block's (floored) log range."""
    lg = torch.log2(_blocks(x).clamp(min=1e-38))
    hi = lg.amax(dim=1, keepdim=True)
    lo = torch.maximum(lg.amin(dim=1, keepdim=True), hi - LOG_RANGE)
    span = (hi - lo).clamp(min=1e-6)
    codes = torch.round((lg.clamp(min=lo) - lo) / span * 255).to(torch.uint8)
    return {"codes": codes.cpu(), "lo": lo.cpu(), "hi": hi.cpu()}


def dequantize_positive(q: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_positive, shaped like `like`."""
    span = (q["hi"] - q["lo"]).clamp(min=1e-6)
    flat = torch.exp2(q["lo"] + q["codes"].float() / 255 * span).flatten()[: like.numel()]
    return flat.view_as(like).to(like.device, like.dtype)


def pack_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW state with 8-bit moments, keyed like Optimizer.state_dict()."""
    sd = opt.state_dict()
    state = {}
    for key, st in sd["state"].items():
        state[key] = {
            "step": st["step"].cpu() if torch.is_tensor(st["step"]) else st["step"],
            "exp_avg": quantize_signed(st["exp_avg"]),
            "exp_avg_sq": quantize_positive(st["exp_avg_sq"]),
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def unpack_optimizer(opt: torch.optim.Optimizer, packed: dict[str, Any]) -> None:
    """Load a pack_optimizer() result into an optimizer over the same parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for key, st in packed["state"].items():
        p = params[int(key)]
        state[key] = {
            "step": st["step"],
            "exp_avg": dequantize_signed(st["exp_avg"], p.data),
            "exp_avg_sq": dequantize_positive(st["exp_avg_sq"], p.data),
        }
    opt.load_state_dict({"state": state, "param_groups": packed["param_groups"]})


def half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as fp16 CPU tensors."""
    return {k: v.detach().to("cpu", torch.float16) for k, v in module.state_dict().items()}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> int:
    """Write payload with torch.save to a temp file, then rename over `path`; returns the size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
