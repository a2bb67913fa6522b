"""How the training step calls the UNet: eagerly, as a captured CUDA graph of the eager kernels, or compiled.

A UNet step at batch size 1 launches thousands of small kernels, so on a fast GPU eager PyTorch waits on
the host. A captured CUDA graph replays the same kernels with one launch (no compiler, seconds to capture);
torch.compile also fuses kernels but compiles for minutes. The runner is a drop-in for
`unet(noisy, timesteps, hidden_states, added_cond_kwargs=...).sample`; the UNet itself is never modified,
so generation, validation images and saving see the plain module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .conditioning import Conditioning
from .errors import SdtuneError

log = logging.getLogger(__name__)
COMPILE_BACKEND = "inductor"  # tests swap in a cheaper dynamo backend
MAX_GRAPHS = 4  # distinct input layouts captured before further ones run eagerly


class UNetCall(torch.nn.Module):
    """The UNet as a function of tensors only (what graph capture and torch.compile want). Trainable
    parameters that live outside the UNet (a hypernetwork's modules) are registered here too, so a captured
    backward computes their gradients."""

    def __init__(self, unet: torch.nn.Module, trainable: list[torch.nn.Parameter], added_keys: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        inside = {id(p) for p in unet.parameters()}
        self.outside = torch.nn.ParameterList([p for p in trainable if id(p) not in inside])
        self.added_keys = added_keys

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, *added: torch.Tensor):
        added_cond = dict(zip(self.added_keys, added)) if self.added_keys else None
        return self.unet(noisy, timesteps, hidden, added_cond_kwargs=added_cond).sample


class UNetRunner:
    """Runs the training step's UNet call in `mode` (off, cuda-graphs or a torch.compile mode)."""

    def __init__(self, unet: torch.nn.Module, mode: str, trainable: list[torch.nn.Parameter],
                 channels_last: bool = False, strict: bool = True,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        self.unet, self.mode, self.trainable, self.strict = unet, mode, trainable, strict
        self.wrap = wrap or (lambda call: call)  # e.g. DDP around the call (parallel.py)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        self._graphs: dict[tuple, object] = {}
        self._compiled = None
        self._call: torch.nn.Module | None = None
        self._keys: tuple[str, ...] | None = None

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        noisy = noisy.contiguous(memory_format=self.memory_format)
        keys = tuple(sorted(cond.added)) if cond.added else ()
        args = (noisy, timesteps, cond.hidden_states, *(cond.added[k] for k in keys))
        if self.mode == "off" or is_in_torch_dispatch_mode():  # e.g. a FLOP counter: it must see the eager ops
            return self._module(keys)(*args)
        if self.mode == "cuda-graphs":
            return self._graphed(keys, args)(*args)
        return self._compiled_call(keys)(*args)

    def _module(self, keys: tuple[str, ...]) -> torch.nn.Module:
        if self._call is None or self._keys != keys:
            self._call, self._keys = self.wrap(UNetCall(self.unet, self.trainable, keys)), keys
        return self._call

    def _compiled_call(self, keys: tuple[str, ...]):
        if self._compiled is None:
            options = {"mode": self.mode} if COMPILE_BACKEND == "inductor" else {}
            self._compiled = torch.compile(self._module(keys), backend=COMPILE_BACKEND, **options)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        return self._compiled

    def _graphed(self, keys: tuple[str, ...], args: tuple[torch.Tensor, ...]):
        """The captured graph for these inputs' shapes, dtypes and requires_grad flags (captured on first use)."""
        layout = tuple((tuple(a.shape), a.dtype, a.requires_grad, a.is_contiguous()) for a in args)
        if layout in self._graphs:
            return self._graphs[layout]
        if len(self._graphs) >= MAX_GRAPHS:
            return self._module(keys)
        try:
            graphed = _capture(UNetCall(self.unet, self.trainable, keys), args)
        except Exception as exc:  # capture fails on code that syncs the host or branches on tensor values
            if self.strict:
                raise SdtuneError(f"The UNet could not be captured as a CUDA graph ({str(exc).splitlines()[0]}); "
                                  "train with --compile off.") from exc
            log.warning("CUDA graph capture failed (%s); the UNet runs eagerly.", str(exc).splitlines()[0])
            self.mode = "off"
            return self._module(keys)
        self._graphs[layout] = graphed
        return graphed


def _capture(call: UNetCall, args: tuple[torch.Tensor, ...]):
    """Warm up and capture `call`'s forward and backward, under the caller's autocast without its weight
    cache (a replayed graph must redo the casts it captured)."""
    samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    device = args[0].device.type
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                        cache_enabled=False):
        return torch.cuda.make_graphed_callables(call, samples, allow_unused_input=True)
