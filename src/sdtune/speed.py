"""The shared loop's speed settings, resolved for the device and run at hand.

Each setting is a TrainConfig field, and none changes what is learned (tests compare loss curves on the CPU):
`compile` (how the UNet's forward and backward run), `adam_impl` (fused, foreach or for-loop AdamW),
`sync_every` (how often the loop reads the loss on the host) and `channels_last`. Per-step host-to-device
copies go through pinned memory so the host never waits for the GPU (see LossLog for the one place it does).
"""

from __future__ import annotations

import math

import torch

from .config import COMPILE_MODES
from .errors import SdtuneError

# How often a CUDA run reads its loss on the host when sync_every is 0 (the CPU reads every step: it is free).
CUDA_SYNC_EVERY = 25
# torch.compile's price and gain on one H200 (SD1.5 LoRA r4, bs1, 512 px, bf16; a probe run): about
# 110 s of compiling before the first step, then 22.7 ms a step with mode="reduce-overhead". What it saves
# over the captured eager graph per step is an estimate until BENCHMARKS.md holds our own measurement;
# `auto` compiles only when the run is long enough for the saving to repay the compile.
COMPILE_SECONDS = 110.0
COMPILE_SAVES_SECONDS_PER_STEP = 0.005
# Capturing a CUDA graph costs about four eager steps (three warm-up passes, then the capture itself), and
# each replay saves most of an eager step, so shorter runs stay eager.
GRAPH_MIN_STEPS = 10


def resolve_compile(choice: str, device_type: str, steps: int, static_shapes: bool, grad_accum: int,
                    gradient_checkpointing: bool, several_processes: bool = False) -> str:
    """The UNet run mode for this run: `choice` itself unless it is auto.

    auto: eager off CUDA (compiling never pays on a CPU); on CUDA a captured graph of the eager kernels when
    every step has the same shapes (no compile time, no launch overhead), torch.compile's reduce-overhead
    mode when the run is long enough to repay compiling, and eager for runs too short to repay a capture
    or when shapes vary, micro-batches accumulate (graph outputs are reused buffers), activations are
    recomputed or several processes exchange gradients during the backward pass (DDP, FSDP).
    """
    if choice not in COMPILE_MODES:
        raise SdtuneError(f"compile is '{choice}'; allowed values are {', '.join(COMPILE_MODES)}.")
    if choice == "cuda-graphs" and device_type != "cuda":
        raise SdtuneError("compile cuda-graphs needs a CUDA device; use off or a torch.compile mode here.")
    if choice == "cuda-graphs" and grad_accum > 1:
        raise SdtuneError("compile cuda-graphs cannot accumulate micro-batches; use --grad-accum 1 or another mode.")
    if choice == "cuda-graphs" and several_processes:
        raise SdtuneError("compile cuda-graphs cannot capture the gradient exchange of several processes; use "
                          "off or a torch.compile mode.")
    if choice != "auto":
        return choice
    if device_type != "cuda" or not static_shapes or grad_accum > 1 or gradient_checkpointing \
            or steps < GRAPH_MIN_STEPS or several_processes:
        return "off"
    if steps * COMPILE_SAVES_SECONDS_PER_STEP > COMPILE_SECONDS:
        return "reduce-overhead"
    return "cuda-graphs"


def adam_options(choice: str, device_type: str) -> dict[str, bool]:
    """torch AdamW keyword arguments for an implementation choice; auto is fused on CUDA (one kernel for all
    parameters, and it can skip a step on the device) and torch's own default elsewhere."""
    if choice == "auto":
        return {"fused": True} if device_type == "cuda" else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[choice]


def can_skip_on_device(optimizer) -> bool:
    """Whether `optimizer` (torch's fused Adam/AdamW) skips its update when its `found_inf` flag is set."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    return bool(getattr(inner, "_step_supports_amp_scaling", False)
                and all(group.get("fused") for group in inner.param_groups))


def sync_interval(requested: int, device_type: str, optimizer, mixed_precision: str) -> int:
    """Steps between host reads of the loss: `requested` (0: 1 on CPU, CUDA_SYNC_EVERY on CUDA), but every
    step when a non-finite loss could not be kept from the weights otherwise (an optimizer that cannot skip a
    step on the device, or fp16's gradient scaler, which owns that flag)."""
    every = requested or (CUDA_SYNC_EVERY if device_type == "cuda" else 1)
    if every > 1 and (not can_skip_on_device(optimizer) or mixed_precision == "fp16"):
        return 1
    return every


class LossLog:
    """Per-step losses, read on the host every `every` steps in one transfer.

    Read every step, a loss is checked before its update. Read less often it is just as safe: a non-finite
    loss sets the fused optimizer's `found_inf` flag on the device, so that update and every later one is
    skipped (a sticky flag), and the next read names the first bad step with the weights exactly as the last
    finite step left them. Checkpoints, validation images and the artifact are written only after a read.
    """

    def __init__(self, every: int, optimizer, device: torch.device):
        self.every = every
        self.latest = math.nan  # the newest loss read on the host
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._optimizer = getattr(optimizer, "optimizer", optimizer)
        self._bad = torch.zeros((), device=device) if every > 1 else None

    def push(self, step: int, loss: torch.Tensor) -> list[tuple[int, float]]:
        """Record step `step`'s loss; returns what must be checked now, before the update (when reading every step)."""
        if self._bad is None:
            return self._read([(step, loss)])
        self._bad = torch.maximum(self._bad, (~torch.isfinite(loss)).float())
        self._optimizer.found_inf = self._bad
        self._pending.append((step, loss.detach()))
        return []

    def due(self, done: int) -> bool:
        """Whether the regular read falls after `done` steps."""
        return self.every > 1 and done % self.every == 0

    def pull(self) -> list[tuple[int, float]]:
        """Every loss recorded since the last read, as (step, value)."""
        pending, self._pending = self._pending, []
        return self._read(pending)

    def _read(self, entries: list[tuple[int, torch.Tensor]]) -> list[tuple[int, float]]:
        if not entries:
            return []
        values = torch.stack([loss.float() for _, loss in entries]).tolist()  # one host transfer
        self.latest = values[-1]
        return [(step, value) for (step, _), value in zip(entries, values)]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to CUDA through pinned memory, so the host does not wait for the copy."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
