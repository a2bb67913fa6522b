"""Resumable training checkpoints under OUTPUT/checkpoints/step-NNNNNN/, each written atomically.

A checkpoint holds the trained values (safetensors), the optimizer, LR-schedule and EMA state (plain
tensors and numbers, so they load with torch.load(weights_only=True)), the step and loss history, and what a
resume must match: the method, the base model (family and fingerprint) and the planned steps. The trained
tensors' names and shapes and the optimizer's group layout are compared from the files themselves, so
checkpoints written before these records existed are checked the same way. A sharded run (FSDP) keeps
each process's shard of the trained values and optimizer state in torch's distributed-checkpoint folder
`shards/` instead, written by every process in place (an output used by several machines must be shared).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .artifacts import atomic_output_dir, load_artifact, save_artifact
from .config import TrainConfig
from .errors import SdtuneError

PREFIX = "step-"
EMA_FILE = "ema.pt"
WEIGHTS_FILE = "trainable.safetensors"
SHARDS_DIR = "shards"
_NAME = re.compile(rf"{PREFIX}(\d+)")
NEW_RUN = "resume with the settings it was trained with or start a new --output"
ANOTHER = "resume from another checkpoint with --resume FOLDER or start a new --output"
# What a checkpoint records about its run -> (words, this run's value, what to keep the same). Absent in
# checkpoints from before these records; those are checked by their tensors and optimizer groups alone.
RECORDS: dict[str, tuple[str, Callable, str]] = {
    "method": ("method", lambda method, model: method.name, "the same method"),
    "family": ("family", lambda method, model: model.family, "the same --model"),
    "base_hash": ("base model fingerprint", lambda method, model: model.fingerprint(), "the same --model"),
}
# state.json's keys -> the types they must have (records added later are optional).
STATE_TYPES: dict[str, tuple[type, bool]] = {
    "step": (int, True), "losses": (list, True), "planned_steps": (int, False),
    **{key: (str, False) for key in RECORDS},
}
TYPE_WORDS: dict[type, str] = {int: "a whole number", list: "a list of numbers", str: "text"}


def folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save(out_dir: Path, step: int, method, model, optimizer, lr_schedule, losses: list[float], cfg: TrainConfig,
         ema=None, engine=None) -> Path:
    """Write checkpoint `step` (with the EMA's state when there is one) and drop the oldest beyond
    cfg.keep_checkpoints; cfg is the run's TrainConfig (its planned steps are recorded). With a parallel
    `engine` every process calls this (a sharding one has each write its shard); without, the main one."""
    target = folder(out_dir) / f"{PREFIX}{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shards = engine.write_shards(target.with_name(f".{target.name}.shards"), optimizer) if engine else None
    if engine is not None and not engine.is_main:
        return target
    with atomic_output_dir(target) as tmp:
        optimizer_state = optimizer.state_dict()
        if shards is None:
            save_artifact(tmp / WEIGHTS_FILE, method.state_dict(model), {"step": str(step)})
        else:  # the shards hold the values and the optimizer's state; the groups stay here for the checks
            os.replace(shards, tmp / SHARDS_DIR)
            optimizer_state = {"state": {}, "param_groups": optimizer_state["param_groups"]}
        torch.save({"optimizer": optimizer_state, "lr_schedule": lr_schedule.state_dict()}, tmp / "optimizer.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / EMA_FILE)
        records = {key: current(method, model) for key, (_, current, _) in RECORDS.items()}
        state = {"step": step, "losses": losses, "planned_steps": cfg.steps, **records}
        (tmp / "state.json").write_text(json.dumps(state))
    for old in list_checkpoints(out_dir)[:-cfg.keep_checkpoints]:
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


def step_of(checkpoint: Path) -> int | None:
    """The step a checkpoint folder's name gives (step-1000000 -> 1000000), None for other names."""
    match = _NAME.fullmatch(checkpoint.name)
    return int(match.group(1)) if match else None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first by step number (half-written ones never get their final name)."""
    root = folder(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


def finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite (one host read however many tensors)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def has_finite_weights(checkpoint: Path) -> bool:
    """Whether the checkpoint's trained values load and are all finite, read one tensor at a time (sharded
    ones were checked by every process before they were written)."""
    if (checkpoint / SHARDS_DIR / ".metadata").is_file():
        return True
    try:
        with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            return all(finite([f.get_tensor(key)]) for key in f.keys())
    except Exception:  # missing or damaged weights: not a checkpoint to point anyone at
        return False


def resumable(out_dir: Path) -> Path | None:
    """The newest checkpoint whose weights are finite (older sdtune versions could save NaN ones)."""
    return next((p for p in reversed(list_checkpoints(out_dir)) if has_finite_weights(p)), None)


def restore(out_dir: Path, cfg: TrainConfig, method, model, optimizer, lr_schedule,
            engine=None) -> tuple[int, list[float]]:
    """Load checkpoint cfg.resume ('latest' or a folder) into the set-up method/optimizer; return (step, losses).
    Refused in one line when it does not fit this run. The learning rates are the ones
    the run is given now (the same, unless lowered after a divergence). Every process calls this."""
    path = _find(out_dir, cfg.resume)
    if path is None:
        return 0, []  # nothing saved yet: a resumed run simply starts from the beginning
    state = read_state(path)
    check_run(path, state, cfg.steps, method, model)
    sharded, shards_here = (path / SHARDS_DIR).is_dir(), bool(engine is not None and engine.shards)
    if sharded != shards_here:
        written = "sharded (--distributed fsdp)" if sharded else "whole"
        raise SdtuneError(f"Checkpoint {path} was written {written}; resume it with "
                          f"{'--distributed fsdp' if sharded else '--distributed ddp or auto'}, as it was trained.")
    if not sharded:
        tensors, _ = load_artifact(path / WEIGHTS_FILE)
        check_tensors(path, tensors, method.state_dict(model))
        method.load_state_dict(model, tensors)
    configured = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    saved, _ = load_artifact(path / "optimizer.pt")  # tensors and numbers only, so never code
    check_optimizer(path, saved, optimizer)
    if sharded:  # the values and the optimizer's state, each process its own shard
        try:
            engine.read_shards(path / SHARDS_DIR, optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:  # another model, settings or number of processes
            raise SdtuneError(f"Checkpoint {path} does not fit this run's sharded model "
                              f"({str(exc).strip().splitlines()[0][:120]}); {NEW_RUN}.") from None
    else:
        optimizer.load_state_dict(saved["optimizer"])
    lr_schedule.load_state_dict(saved["lr_schedule"])
    _use_learning_rates(optimizer, lr_schedule, configured)
    return state["step"], [float(loss) for loss in state["losses"]]


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, refused in one line when it is not JSON or its keys have the wrong types."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"not readable JSON: {' '.join(str(exc).split())[:100]}") from exc
    if not isinstance(state, dict):
        raise _damaged(path, "not a JSON object")
    for key, (kind, required) in STATE_TYPES.items():
        value = state.get(key)
        if (value is not None or required) and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _damaged(path, f"'{key}' is {value!r:.60}, not {TYPE_WORDS[kind]}")
    bad = [v for v in state["losses"] if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad or state["step"] < 0:
        raise _damaged(path, f"'losses' holds {bad[0]!r:.60}" if bad else f"'step' is {state['step']}")
    return state


def _damaged(path: Path, what: str) -> SdtuneError:
    return SdtuneError(f"Checkpoint {path} has a damaged state.json ({what}); {ANOTHER}.")


def check_run(path: Path, state: dict, steps: int, method, model) -> None:
    """Refuse a checkpoint past this run's last step or recorded for another method or base model."""
    if state["step"] > steps:
        least = max(state.get("planned_steps") or 0, state["step"])
        raise SdtuneError(f"Checkpoint {path} is at step {state['step']}, past this run's --steps {steps}; "
                          f"resume with --steps {least} or more, or start a new --output.")
    for key, (words, current, keep) in RECORDS.items():
        saved, ours = state.get(key), current(method, model)
        if saved is not None and saved != ours:
            raise SdtuneError(f"Checkpoint {path} was trained with {words} {saved}, this run's is {ours}; "
                              f"resume with {keep} or start a new --output.")


def check_tensors(path: Path, saved: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> None:
    """Refuse saved trained values whose names or shapes differ from what this run's setup trains (another
    rank, targets, text-encoder training...), or that are not finite."""
    shapes = {k: list(v.shape) for k, v in saved.items()}
    expected = {k: list(v.shape) for k, v in ours.items()}
    extra, missing = sorted(shapes.keys() - expected.keys()), sorted(expected.keys() - shapes.keys())
    differs = [k for k in sorted(shapes.keys() & expected.keys()) if shapes[k] != expected[k]]
    if extra or missing or differs:
        detail = (f"it holds {extra[0]}, which this run does not train" if extra else
                  f"it lacks {missing[0]}, which this run trains" if missing else
                  f"{differs[0]} is {shapes[differs[0]]} there and {expected[differs[0]]} here")
        raise SdtuneError(f"Checkpoint {path} does not fit this run's trained tensors ({detail}: other method "
                          f"settings, e.g. rank, targets or text-encoder training); {NEW_RUN}.")
    if not finite(saved.values()):
        raise SdtuneError(f"Checkpoint {path} holds non-finite weights (NaN or inf); {ANOTHER}.")


def check_optimizer(path: Path, saved, optimizer) -> None:
    """Refuse optimizer state whose parameter groups differ from this run's (e.g. another LoRA+ ratio)."""
    theirs = _group_sizes(saved)
    if theirs is None:
        raise SdtuneError(f"Checkpoint {path} has a damaged optimizer.pt (no optimizer or schedule state); {ANOTHER}.")
    ours = [len(group["params"]) for group in optimizer.param_groups]
    if theirs != ours:
        raise SdtuneError(f"Checkpoint {path} has optimizer groups of {theirs} parameters, this run {ours} "
                          f"(other per-group learning rates, e.g. a LoRA+ ratio or text-encoder lr); {NEW_RUN}.")


def _group_sizes(saved) -> list[int] | None:
    """Parameters per saved optimizer group, None when optimizer.pt lacks the expected structure."""
    inner = saved.get("optimizer") if isinstance(saved, dict) else None
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("lr_schedule"), dict):
        return None
    if not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
        return None
    return [len(group["params"]) for group in groups]


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
