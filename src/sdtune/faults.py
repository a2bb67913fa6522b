"""What a run says when training itself fails: a diverged loss or a device out of memory.

Both become one-sentence SdtuneErrors that name the settings that fix them and the checkpoint a
`--resume latest` continues from, so the CLI (and the UI) show advice instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from . import checkpoints
from .errors import SdtuneError

# torch >= 2.5 has torch.OutOfMemoryError; older builds only the CUDA one (the same class since 2.5).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
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


@contextlib.contextmanager
def memory_advice(out_dir: str | Path) -> Iterator[None]:
    """Turn a device out-of-memory error inside the block into `out_of_memory` advice."""
    try:
        yield
    except OUT_OF_MEMORY as exc:
        device = "the GPU" if "CUDA" in str(exc) or "GPU" in str(exc) else "the device"
        raise out_of_memory(Path(out_dir), device) from exc
