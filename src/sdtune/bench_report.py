"""`sdtune bench` commands and their tables: steps (timed runs), sizes (full-scale artifacts) and scaling
(step time and peak memory against resolution and batch size, one fresh process per row so each row's
peak is its own)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from .bench import BenchSpec, quiet_warnings, run_bench
from .bench_sizes import WORLD_SIZES, artifact_sizes, human_bytes, sharded_state
from .errors import SdtuneError

BENCH_KINDS = ("steps", "sizes", "scaling", "sharding")


def bench_from_args(args) -> str:
    """`sdtune bench` parsed arguments -> the text to print."""
    from .methods import registry

    spec = BenchSpec(model=args.model, methods=list(registry()) if args.method == "all" else _items(args.method),
                     compile_modes=_items(args.compile), batch_size=args.batch_size, resolution=args.resolution,
                     steps=args.steps, warmup=args.warmup, mixed_precision=args.mixed_precision,
                     channels_last=args.channels_last, device=args.device, seed=args.seed, output=args.output)
    return bench_command(args.kind, spec, args.json, _numbers(args.resolutions, "--resolutions"),
                         _numbers(args.batch_sizes, "--batch-sizes"))


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _numbers(text: str, flag: str) -> list[int]:
    try:
        numbers = [int(item) for item in _items(text)]
    except ValueError:
        raise SdtuneError(f"{flag} '{text}' must be a comma list of whole numbers.") from None
    if not numbers or min(numbers) < 1:
        raise SdtuneError(f"{flag} '{text}' must list numbers of at least 1.")
    return numbers


def bench_command(kind: str, spec: BenchSpec, as_json: bool, resolutions: list[int], batch_sizes: list[int]) -> str:
    """Run one kind of benchmark; the text to print (a table, or one JSON line)."""
    if kind == "steps":
        result = run_bench(spec)
    elif kind == "sizes":
        spec.check()
        with quiet_warnings():
            result = artifact_sizes(spec.model, spec.methods)
    elif kind == "scaling":
        result = scaling(spec, resolutions, batch_sizes)
    elif kind == "sharding":
        spec.check()
        with quiet_warnings():
            result = sharded_state(spec.model, spec.methods)
    else:
        raise SdtuneError(f"Unknown benchmark '{kind}'; use one of {', '.join(BENCH_KINDS)}.")
    if as_json:
        return json.dumps(result)
    tables = {"steps": steps_table, "sizes": sizes_table, "scaling": scaling_table, "sharding": sharding_table}
    return tables[kind](result)


def _cell(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _machine_line(machine: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in machine.items())


def steps_table(result: dict) -> str:
    """The timed runs: throughput, memory, FLOPs and MFU per method and UNet mode."""
    peak = "peak GiB" if result["machine"]["device"].startswith("cuda") else "peak RSS GiB"
    header = ["method", "model", "UNet", "bs", "px", "steps/s", "images/s", "ms/step", peak, "TFLOP/step", "MFU",
              "first step s", "artifact"]
    rows = []
    for run in result["runs"]:
        if run["error"]:
            rows.append([run["method"], run["model"], run["compile"], str(run["batch_size"]), _cell(run.get("resolution")),
                         f"error: {run['error']}"] + [""] * 7)
            continue
        rows.append([run["method"], run["model"], f"{run['compile']}->{run['compile_used']}", str(run["batch_size"]),
                     str(run["resolution"]), _cell(run["steps_per_s"]), _cell(run["images_per_s"]),
                     _cell(run["ms_per_step"], 1), _cell(run["peak_gib"]), _cell(run["tflop_per_step"], 4),
                     f"{run['mfu']:.1%}" if run.get("mfu") else "-", _cell(run["first_step_s"], 1),
                     human_bytes(run["artifact_bytes"])])
    ceiling = f"matmul ceiling {result['ceiling_tflops']:.2f} TFLOP/s ({result['ceiling_dtype']})"
    return f"{_machine_line(result['machine'])}; {ceiling}\n\n" + _table(header, rows)


def sizes_table(result: dict) -> str:
    """Each method's default artifact at full scale."""
    header = ["method", "trained values", "artifact", "files", "how"]
    rows = [[row["method"], f"{row['trainable_params']:,}", human_bytes(row["bytes"]),
             ", ".join(f"{name} {human_bytes(size)}" for name, size in row["files"].items()), row["how"]]
            for row in result["rows"]]
    return f"model {result['model']}\n\n" + _table(header, rows)


def sharding_table(result: dict) -> str:
    """Each method's trained state per process (values, gradients, AdamW) at 1-8 processes."""
    header = ["method", "trained values", "engine", *(f"{n} process{'es' if n > 1 else ''}" for n in WORLD_SIZES),
              "largest FSDP unit"]
    rows = [[row["method"], f"{row['trainable_params']:,}", row["engine"],
             *(human_bytes(row["per_process"][n]) for n in WORLD_SIZES),
             f"{row['largest_unit']:,}" if row["largest_unit"] else "–"] for row in result["rows"]]
    return f"model {result['model']}\n\n" + _table(header, rows)


def scaling(spec: BenchSpec, resolutions: list[int], batch_sizes: list[int]) -> dict:
    """One timed run per (resolution, batch size) of the first method and UNet mode, each in a fresh process."""
    spec.check()
    rows = []
    for resolution in resolutions:
        for batch_size in batch_sizes:
            rows.append(_child_run(spec, resolution, batch_size))
    return {"kind": "scaling", "method": spec.methods[0], "model": spec.model, "rows": rows,
            "machine": rows[0].get("machine", {}) if rows else {}}


def _child_run(spec: BenchSpec, resolution: int, batch_size: int) -> dict:
    args = [sys.executable, "-m", "sdtune.cli", "bench", "steps", "--json", "--model", spec.model,
            "--method", spec.methods[0], "--compile", spec.compile_modes[0], "--resolution", str(resolution),
            "--batch-size", str(batch_size), "--steps", str(spec.steps), "--warmup", str(spec.warmup),
            "--mixed-precision", spec.mixed_precision, "--device", spec.device, "--seed", str(spec.seed)]
    args += ["--channels-last"] if spec.channels_last else []
    done = subprocess.run(args, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"resolution": resolution, "batch_size": batch_size, "error": why[:300]}
    result = json.loads(lines[-1])
    return {**result["runs"][0], "machine": result["machine"]}


def scaling_table(result: dict) -> str:
    """ms/step and peak memory per resolution (rows) and batch size (columns)."""
    sizes = sorted({row["batch_size"] for row in result["rows"]})
    resolutions = sorted({row["resolution"] for row in result["rows"]})
    cells = {(row["resolution"], row["batch_size"]): row for row in result["rows"]}

    def cell(row: dict | None) -> str:
        if row is None:
            return "-"
        if row.get("error"):
            return f"error: {row['error'][:60]}"
        return f"{row['ms_per_step']:.1f} ms, {row['peak_gib']:.2f} GiB"

    header = ["px"] + [f"bs {b}" for b in sizes]
    rows = [[str(r)] + [cell(cells.get((r, b))) for b in sizes] for r in resolutions]
    title = f"{result['method']} on {result['model']}: ms/step, peak memory"
    return f"{title}; {_machine_line(result['machine'])}\n\n" + _table(header, rows)
