"""Resumable training checkpoints under OUTPUT/checkpoints/step-NNNNNN/, each written atomically.

A checkpoint holds the trained values (safetensors), the optimizer and LR-schedule state (plain tensors
and numbers, so they load with torch.load(weights_only=True)) and the step and loss history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .artifacts import atomic_output_dir, load_artifact, save_artifact
from .errors import SdtuneError

PREFIX = "step-"


def folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save(out_dir: Path, step: int, method, model, optimizer, lr_schedule, losses: list[float], keep: int) -> Path:
    """Write checkpoint `step` and drop the oldest beyond `keep`."""
    target = folder(out_dir) / f"{PREFIX}{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target) as tmp:
        save_artifact(tmp / "trainable.safetensors", method.state_dict(model), {"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never get their final name)."""
    root = folder(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def restore(out_dir: Path, which: str, method, model, optimizer, lr_schedule) -> tuple[int, list[float]]:
    """Load checkpoint `which` ('latest' or a folder) into the set-up method/optimizer; return (step, losses)."""
    if which == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            return 0, []  # nothing saved yet: a resumed run simply starts from the beginning
        path = found[-1]
    else:
        path = Path(which)
        if not (path / "state.json").is_file():
            raise SdtuneError(f"{which} is not a checkpoint folder (no state.json); use --resume latest or a "
                              f"folder under {folder(out_dir)}.")
    tensors, _ = load_artifact(path / "trainable.safetensors")
    method.load_state_dict(model, tensors)
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    lr_schedule.load_state_dict(saved["lr_schedule"])
    state = json.loads((path / "state.json").read_text())
    return int(state["step"]), list(state["losses"])
