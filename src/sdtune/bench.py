"""`sdtune bench`: the shared loop's real training step, timed on random-init models.

Each method trains through `train()` exactly as `sdtune train` runs it, on synthetic images the bench draws
itself. An `on_step` callback marks the timed window (after `warmup` steps; the device is synchronised only at
the window's two ends, so asynchronous execution is measured as it runs) and counts one extra step's FLOPs with
torch.utils.flop_counter.FlopCounterMode. MFU is achieved FLOP/s over a matrix-product ceiling measured on the
same device. Full-size models (random:sd15|sd2|sdxl) need a GPU; tiny:* models run anywhere.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import COMPILE_MODES
from .errors import SdtuneError

DEFAULT_TOKEN = "sks"  # the subject's word, as each method spells it (its token_template)
GIB = 2**30


@dataclass
class BenchSpec:
    """What to benchmark: every method x compile mode combination is one run."""

    model: str = "tiny:sd1"
    methods: list[str] = field(default_factory=lambda: [_first_method()])
    compile_modes: list[str] = field(default_factory=lambda: ["auto"])
    batch_size: int = 1
    resolution: int = 0  # 0: the model's native resolution
    steps: int = 20
    warmup: int = 5
    mixed_precision: str = "auto"  # bf16 on CUDA, none elsewhere
    channels_last: bool = False
    device: str = "auto"
    seed: int = 0
    output: str = ""  # keep the artifacts here (default: a temporary folder)

    def precision(self, device: torch.device) -> str:
        """The mixed precision the runs use."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if device.type == "cuda" else "no"

    def check(self) -> None:
        """Refuse settings the bench cannot time, naming the setting."""
        from . import methods

        for name in self.methods:
            methods.get(name)
        unknown = [m for m in self.compile_modes if m not in COMPILE_MODES]
        if unknown:
            raise SdtuneError(f"--compile '{unknown[0]}' is not one of {', '.join(COMPILE_MODES)}.")
        if self.steps < 1 or self.warmup < 1 or self.batch_size < 1:
            raise SdtuneError("--steps, --warmup and --batch-size must be at least 1.")
        if self.output:
            from .outputs import check_folder_path

            check_folder_path(Path(self.output), "--output")  # before any model is built


def _first_method() -> str:
    from .methods import first

    return first()


class StepClock:
    """`train()`'s on_step callback: times steps warmup+1 .. warmup+steps, then counts the next step's FLOPs."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.start = time.perf_counter()
        self.first_step_s = self.window_s = math.nan
        self.flops = 0
        self._t0 = 0.0
        self._counter = None

    def __call__(self, done: int, loss: float) -> None:
        if done == 1:
            self.first_step_s = time.perf_counter() - self.start  # set-up, caches, graph capture or compile
        if done == self.warmup:
            self._t0 = self._synchronised_now()
        if done == self.warmup + self.steps:
            self.window_s = self._synchronised_now() - self._t0
            self._counter = flop_counter()
            self._counter.__enter__()
        elif done == self.warmup + self.steps + 1:
            self.close()

    def close(self) -> None:
        """Stop counting (also when a run failed part-way)."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None

    def _synchronised_now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence sdtune's advice for users (e.g. DreamBooth's rare-token warning) while benchmarking."""
    logger = logging.getLogger("sdtune")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def flop_counter():
    """FlopCounterMode, also counting the CPU's fused attention (torch counts only the GPU kernels)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def attention(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward})


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on `device` in `dtype` (median of timed repeats, random data)."""
    n, repeats = (8192, 10) if device.type == "cuda" else (1024, 5)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1000
        else:
            began = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - began
        if i >= 3:  # warm-up first
            times.append(seconds)
    return 2 * n**3 / statistics.median(times)


def machine(device: torch.device) -> dict[str, str]:
    """The machine and library versions a figure was measured with."""
    import diffusers
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": f"{device.type}: {name}", "threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "cuda": str(torch.version.cuda), "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def write_synthetic_images(folder: Path, resolution: int, count: int = 4) -> Path:
    """`count` distinct subject pictures (a lit disc on a coloured gradient) at `resolution` pixels."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ramp = torch.linspace(0, 1, resolution)
        pixels = torch.stack([ramp[None, :].expand(resolution, -1) * (60 + 40 * (i % 5)),
                              ramp[:, None].expand(-1, resolution) * 120, torch.full((resolution, resolution), 90.0)])
        image = Image.fromarray(pixels.permute(1, 2, 0).to(torch.uint8).numpy())
        edge = resolution // 4 + (i % 8) * resolution // 32  # stays a disc for any count
        ImageDraw.Draw(image).ellipse([edge, edge, resolution - edge, resolution - edge], fill=(240, 200, 40))
        image.save(folder / f"subject_{i}.png")
    return folder


def build_model(spec: str, device: torch.device):
    """A built-in architecture initialised directly on `device`, or any other model spec loaded."""
    from .model import build_from_config, load

    if spec.startswith(("tiny:", "random:")):
        return build_from_config(spec, device=device)
    return load(spec)


def run_one(spec: BenchSpec, method_name: str, compile_mode: str, device: torch.device, work: Path) -> dict:
    """One timed training run; failures (out of memory, a refused setting) become the record's `error`."""
    from . import methods
    from .config import DataConfig, TrainConfig
    from .train import train

    record = {"method": method_name, "model": spec.model, "compile": compile_mode, "batch_size": spec.batch_size,
              "steps": spec.steps, "warmup": spec.warmup, "channels_last": spec.channels_last, "error": None}
    clock = StepClock(device, spec.warmup, spec.steps)
    model = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # each run's peak is its own (train() resets it again
            # after loading, except for methods that keep the frozen weights in full precision)
        model = build_model(spec.model, device)
        resolution = spec.resolution or model.resolution
        precision = spec.precision(device)
        record.update(resolution=resolution, mixed_precision=precision)
        images = write_synthetic_images(work / f"images-{resolution}", resolution, max(4, spec.batch_size))
        method_cls = methods.get(method_name)
        # A typical learning rate (the step's cost does not depend on it), the method's own spelling of the token.
        train_cfg = TrainConfig(steps=spec.warmup + spec.steps + 1, batch_size=spec.batch_size, seed=spec.seed,
                                lr=method_cls.default_lr, device=device.type, mixed_precision=precision,
                                compile=compile_mode, channels_last=spec.channels_last, log_dir="none")
        data_cfg = DataConfig(images=str(images), token=method_cls.token_template.format(token=DEFAULT_TOKEN),
                              class_word="dog", resolution=resolution)
        clock.start = time.perf_counter()
        result = train(model, method_cls(), train_cfg, data_cfg, work / method_name, method_name, progress=False,
                       on_step=clock)
        record.update(_figures(clock, result, spec, device))
    except (SdtuneError, torch.OutOfMemoryError, RuntimeError) as exc:
        record["error"] = str(exc).splitlines()[0][:300]
    finally:
        clock.close()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def _figures(clock: StepClock, result, spec: BenchSpec, device: torch.device) -> dict:
    steps_per_s = spec.steps / clock.window_s
    files = [p for path in result.paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    figures = {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * spec.batch_size,
               "ms_per_step": 1000 / steps_per_s, "peak_gib": result.peak_memory / GIB,
               "tflop_per_step": clock.flops / 1e12, "first_step_s": clock.first_step_s,
               "wall_s": time.perf_counter() - clock.start, "artifact_bytes": sum(p.stat().st_size for p in files),
               "artifact": [p.name for p in result.paths], "trainable_params": result.trainable_params,
               "losses": result.losses, **{f"{k}_used": v for k, v in result.speed.items()}}
    if device.type == "cuda":
        figures["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return figures


def _progress_line(run: dict) -> str:
    if run["error"]:
        return f"{run['method']} {run['compile']}: error {run['error']}"
    return (f"{run['method']} {run['compile']}->{run['compile_used']} bs{run['batch_size']} {run['resolution']} px: "
            f"{run['steps_per_s']:.2f} steps/s, peak {run['peak_gib']:.2f} GiB, first step {run['first_step_s']:.1f} s, "
            f"{run['tflop_per_step']:.3f} TFLOP/step")


def run_bench(spec: BenchSpec) -> dict:
    """Every run of `spec` plus the machine and the matrix-product ceiling its MFU figures use."""
    from .runtime import resolve_device

    spec.check()
    device = torch.device(resolve_device(spec.device))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp, quiet_warnings():
        work = Path(spec.output) if spec.output else Path(tmp)
        for method_name in spec.methods:
            for mode in spec.compile_modes:
                runs.append(run_one(spec, method_name, mode, device, work))
                print(f"bench: {_progress_line(runs[-1])}", file=sys.stderr, flush=True)  # survives a kill
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision(device), torch.float32)
    ceiling = matmul_ceiling(device, dtype)
    for run in runs:
        if run.get("tflop_per_step"):
            run["mfu"] = run["tflop_per_step"] * 1e12 * run["steps_per_s"] / ceiling
    return {"kind": "steps", "machine": machine(device), "ceiling_tflops": ceiling / 1e12,
            "ceiling_dtype": str(dtype).removeprefix("torch."), "runs": runs}

