"""What a run says when training itself fails: a diverged loss, non-finite weights or a device out of memory.

Each becomes one-sentence SdtuneErrors that name the settings that fix them and the checkpoint a
`--resume latest` continues from, so the CLI (and the UI) show advice instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from . import checkpoints
from .errors import SdtuneError

# torch >= 2.5 has torch.OutOfMemoryError; older builds only the CUDA one (the same class since 2.5).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# A CPU allocation failure is a plain RuntimeError from torch's allocator; these phrases tell it apart.
CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
# Settings that lower training memory, cheapest first (flag, what it does).
MEMORY_SAVERS: tuple[tuple[str, str], ...] = (
    ("--batch-size 1 with --grad-accum N", "same global batch, less memory"),
    ("--gradient-checkpointing", "recomputes activations"),
    ("--mixed-precision bf16", "or fp16 on GPUs without bf16"),
    ("--use-8bit-adam", "CUDA with bitsandbytes"),
    ("a lower --resolution", "memory grows with pixels"),
)


def resume_hint(out_dir: Path) -> str:
    """Where a later run should resume from, in words: only ever a checkpoint whose weights are finite."""
    good = checkpoints.resumable(Path(out_dir))
    if good is None:
        return "then run again (no checkpoint with finite weights was saved yet; --checkpoint-every N keeps one)"
    if good == checkpoints.list_checkpoints(Path(out_dir))[-1]:
        return f"then run again with --resume latest to continue from {good}"
    return f"then run again with --resume {good} (the newest checkpoint whose weights are finite)"


def diverged(step: int, loss: float, lr: float, out_dir: Path) -> SdtuneError:
    """The error for a non-finite loss at `step` (1-based), raised before the update reaches the weights."""
    return SdtuneError(
        f"Training diverged at step {step} (loss is {loss}) and stopped before the weights were touched; "
        f"lower --lr (now {lr:g}), tighten --max-grad-norm or use --mixed-precision bf16 instead of fp16, "
        f"{resume_hint(out_dir)}.")


def check_weights(params: Iterable[torch.Tensor], step: int, lr: float, weight_decay: float, out_dir: Path) -> None:
    """Refuse to go on to a write when the trained weights are not finite after `step` (1-based): a finite
    loss does not rule that out (e.g. an infinite weight decay, or a fused optimizer's step on the device)."""
    if not checkpoints.finite(params):
        raise SdtuneError(
            f"Training made the trained weights non-finite (NaN or inf) by step {step} and nothing was written; "
            f"lower --weight-decay (now {weight_decay:g}) or --lr (now {lr:g}), {resume_hint(out_dir)}.")


def out_of_memory(out_dir: Path, device: str = "the device") -> SdtuneError:
    """The error for an allocation failure on the training device, naming the settings that save memory."""
    savers = "; ".join(f"{flag} ({why})" for flag, why in MEMORY_SAVERS)
    return SdtuneError(f"Training ran out of memory on {device}; try {savers}, {resume_hint(out_dir)}.")


def out_of_memory_device(exc: BaseException) -> str | None:
    """Where an exception says memory ran out ("the GPU", "the CPU", "the device"), or None for other errors."""
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(m in text for m in CPU_OUT_OF_MEMORY)):
        return "the CPU"
    if isinstance(exc, OUT_OF_MEMORY):
        return "the GPU" if "CUDA" in text or "GPU" in text else "the device"
    return None


@contextlib.contextmanager
def _advice_on_out_of_memory(advice: Callable[[str], SdtuneError]) -> Iterator[None]:
    """Turn an out-of-memory error inside the block, on any device, into `advice(device)`."""
    try:
        yield
    except Exception as exc:
        device = out_of_memory_device(exc)
        if device is None:
            raise
        raise advice(device) from exc


@contextlib.contextmanager
def memory_advice(out_dir: str | Path) -> Iterator[None]:
    """Turn a device or CPU out-of-memory error inside the block into `out_of_memory` advice."""
    with _advice_on_out_of_memory(lambda device: out_of_memory(Path(out_dir), device)):
        yield


@contextlib.contextmanager
def generation_memory_advice() -> Iterator[None]:
    """The same for sampling: name the options that shrink what generate holds in memory."""
    with _advice_on_out_of_memory(lambda device: SdtuneError(
            f"Generating ran out of memory on {device}; use a smaller --width/--height, fewer -n images or "
            "fewer prompt artifacts.")):
        yield
