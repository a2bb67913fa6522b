"""Resumable training checkpoints under OUTPUT/checkpoints/step-NNNNNN/, each written atomically.

A checkpoint holds the trained values (safetensors), the optimizer, LR-schedule and EMA state (plain
tensors and numbers, so they load with torch.load(weights_only=True)) and the step and loss history.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .artifacts import atomic_output_dir, load_artifact, save_artifact
from .errors import SdtuneError

PREFIX = "step-"
EMA_FILE = "ema.pt"
WEIGHTS_FILE = "trainable.safetensors"


def folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save(out_dir: Path, step: int, method, model, optimizer, lr_schedule, losses: list[float], keep: int,
         ema=None) -> Path:
    """Write checkpoint `step` (with the EMA's state when there is one) and drop the oldest beyond `keep`."""
    target = folder(out_dir) / f"{PREFIX}{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target) as tmp:
        save_artifact(tmp / WEIGHTS_FILE, method.state_dict(model), {"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()},
                   tmp / "optimizer.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / EMA_FILE)
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    for old in list_checkpoints(out_dir)[:-keep]:
        _remove(old)
    for stale in folder(out_dir).glob(f".{PREFIX}*"):  # half-written by a run that was killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _remove(checkpoint: Path) -> None:
    """Hide the folder first (one rename), then delete it: a kill during the deletion leaves a hidden
    remnant for the next save to sweep, never a checkpoint that lists as complete but lacks its weights."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        os.replace(checkpoint, hidden)
    except OSError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never get their final name)."""
    root = folder(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite (one host read however many tensors)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def has_finite_weights(checkpoint: Path) -> bool:
    """Whether the checkpoint's trained values load and are all finite, read one tensor at a time."""
    try:
        with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            return all(finite([f.get_tensor(key)]) for key in f.keys())
    except Exception:  # missing or damaged weights: not a checkpoint to point anyone at
        return False


def resumable(out_dir: Path) -> Path | None:
    """The newest checkpoint whose weights are finite (older sdtune versions could save NaN ones)."""
    return next((p for p in reversed(list_checkpoints(out_dir)) if has_finite_weights(p)), None)


def restore(out_dir: Path, which: str, method, model, optimizer, lr_schedule) -> tuple[int, list[float]]:
    """Load checkpoint `which` ('latest' or a folder) into the set-up method/optimizer; return (step, losses).
    The learning rates are the ones the run is given now (the same, unless lowered after a divergence)."""
    path = _find(out_dir, which)
    if path is None:
        return 0, []  # nothing saved yet: a resumed run simply starts from the beginning
    tensors, _ = load_artifact(path / WEIGHTS_FILE)
    if not finite(tensors.values()):  # older sdtune versions could save NaN weights
        raise SdtuneError(f"Checkpoint {path} holds non-finite weights (NaN or inf); resume from another "
                          "checkpoint with --resume FOLDER or start a new --output.")
    method.load_state_dict(model, tensors)
    configured = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    saved, _ = load_artifact(path / "optimizer.pt")  # tensors and numbers only, so never code
    optimizer.load_state_dict(saved["optimizer"])
    lr_schedule.load_state_dict(saved["lr_schedule"])
    _use_learning_rates(optimizer, lr_schedule, configured)
    state = json.loads((path / "state.json").read_text())
    return int(state["step"]), list(state["losses"])


def restore_ema(out_dir: Path, which: str, ema) -> None:
    """Put the EMA of checkpoint `which` back; one saved without an EMA leaves `ema` as it is."""
    path = _find(out_dir, which)
    if path is None or not (path / EMA_FILE).is_file():
        return
    saved, _ = load_artifact(path / EMA_FILE)
    shadow = saved.get("shadow_params") or []
    if [t.shape for t in shadow] != [t.shape for t in ema.shadow_params]:
        raise SdtuneError(f"The EMA in {path} does not fit this run's trained weights; resume without --ema-decay "
                          "or from a checkpoint of the same settings.")
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.load_state_dict(saved)
    ema.to(device=device)


def _find(out_dir: Path, which: str) -> Path | None:
    """The checkpoint folder `which` names ('latest': the newest, None when there is none)."""
    if which == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(which)
    if not (path / "state.json").is_file():
        raise SdtuneError(f"{which} is not a checkpoint folder (no state.json); use --resume latest or a "
                          f"folder under {folder(out_dir)}.")
    return path


def _use_learning_rates(optimizer, lr_schedule, configured: list[float]) -> None:
    """Make the restored schedule run from the configured base rates at its restored position (diffusers'
    schedules are LambdaLR: lr = base * factor(step)); with unchanged settings every value stays the same."""
    lr_schedule.base_lrs = list(configured)
    factors = getattr(lr_schedule, "lr_lambdas", None)
    for i, (group, base) in enumerate(zip(optimizer.param_groups, configured)):
        group["initial_lr"] = base
        if factors is not None:
            group["lr"] = base * factors[i](lr_schedule.last_epoch)
