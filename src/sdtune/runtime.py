"""Device choice, accelerate set-up (with the process group's timeout) and peak-memory readings."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator

import torch

from .errors import SdtuneError


def resolve_device(choice: str) -> str:
    """Turn --device auto|cpu|cuda|mps into a device that exists here, or say why it cannot."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SdtuneError("--device cuda was asked for but this torch build sees no CUDA GPU.")
    if choice == "mps" and not has_mps:
        raise SdtuneError("--device mps was asked for but no Apple MPS device is available.")
    return choice


def is_main_process() -> bool:
    """Whether this is the first process of a run (torchrun and accelerate launch set RANK), known before the
    Accelerator is built: only it checks and locks the output folder."""
    return os.environ.get("RANK", "0") == "0"


def make_accelerator(cfg):
    """An Accelerator on the chosen device; multi-process when launched by torchrun/accelerate launch."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    device = resolve_device(cfg.device)
    if cfg.mixed_precision == "fp16" and device == "cpu":
        raise SdtuneError("mixed_precision fp16 is not supported on the CPU; use bf16 or no.")
    # accelerate keeps precision in a process-wide singleton; each run (tests, the UI) sets its own.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Gradient accumulation is done by the loop itself (it also spans processes), so accelerate's is off.
    # The timeout bounds how long a process waits in a collective for one that stopped answering.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed_timeout))
    return Accelerator(cpu=device == "cpu", mixed_precision=cfg.mixed_precision, kwargs_handlers=[timeout])


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on GPU; this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread: tiny models gain nothing from more, idle OpenMP threads
    spin against other processes, and float sums then match a process started with OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
