"""What a run says when training itself fails: a diverged loss or a device out of memory.

Both become one-sentence SdtuneErrors that name the settings that fix them and the checkpoint a
`--resume latest` continues from, so the CLI (and the UI) show advice instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """Where a later `--resume latest` would continue from, in words."""
    found = checkpoints.list_checkpoints(Path(out_dir))
    if found:
        return f"then run again with --resume latest to continue from {found[-1]}"
    return "then run again (no checkpoint was saved yet; --checkpoint-every N keeps one)"


def diverged(step: int, loss: float, lr: float, out_dir: Path) -> SdtuneError:
    """The error for a non-finite loss at `step` (1-based), raised before the update reaches the weights."""
    return SdtuneError(
        f"Training diverged at step {step} (loss is {loss}) and stopped before the weights were touched; "
        f"lower --lr (now {lr:g}), tighten --max-grad-norm or use --mixed-precision bf16 instead of fp16, "
        f"{resume_hint(out_dir)}.")


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
