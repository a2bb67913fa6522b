"""results.json: per row its settings, costs (mean and range over seeds), quality at the end and along the
run (pooled over seeds, with 95% intervals), plus the machine and library versions that produced it."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from .judge import Samples
from .recipes import Plan
from .sampling import fill, load_samples

COSTS = ("wall_time_s", "peak_memory_bytes", "trainable_params", "artifact_bytes")
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "matplotlib")


def assemble(plan: Plan, options: dict, runs: dict[tuple[str, int], dict], judge, out: Path, seconds: float) -> dict:
    """The whole comparison as plain data (what results.json holds and the report is built from)."""
    seeds = sorted({seed for _, seed in runs})
    class_run = runs.get(("class-images", 0), {})
    return {
        "sdtune_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "profile": plan.profile,
        "subject": {"token": plan.token, "class_word": plan.class_word},
        "seeds": seeds,
        "wall_time_s": round(seconds, 1),
        "runs_reused": sum(1 for run in runs.values() if run.get("reused")),
        "runs": len(runs),
        "evaluation": {**asdict(plan.evaluation),
                       "prompts": fill(plan.evaluation.prompts, plan.token, plan.class_word),
                       "class_prompts": fill(plan.evaluation.class_prompts, plan.token, plan.class_word)},
        "metrics": [asdict(m) for m in judge.metrics],
        "missing_metrics": dict(judge.missing),
        "class_images": {k: class_run.get(k) for k in ("count", "seconds", "error")} if class_run else None,
        "rows": [_row(row, [runs[(row.name, s)] for s in seeds], judge, out, plan.rows[0].data) for row in plan.rows],
        "machine": machine(),
        "versions": versions(),
    }


def _row(row, seed_runs: list[dict], judge, out: Path, shared: dict) -> dict:
    ok = [run for run in seed_runs if "error" not in run]
    entry = {"name": row.name, "method": row.method, "steps": row.steps, "settings": row.settings(shared),
             "seeds_ok": len(ok), "errors": sorted({run["error"] for run in seed_runs if "error" in run})}
    if not ok:
        return entry
    folders = [out / "runs" / row.name / f"seed-{run['seed']}" for run in ok]
    curve = []
    for point, evaluation in enumerate(ok[0]["evaluations"]):
        samples = [_samples(run["seed"], folder / run["evaluations"][point]["file"]) for run, folder in zip(ok, folders)]
        curve.append({"step": evaluation["step"],
                      "seconds": _mean([run["evaluations"][point]["seconds"] for run in ok]),
                      "quality": _estimates(judge.score(samples))})
    final = [_samples(run["seed"], folder / run["evaluations"][-1]["file"]) for run, folder in zip(ok, folders)]
    entry.update(
        cost={key: _spread([run[key] for run in ok if run.get(key) is not None]) for key in COSTS},
        memory_kind=ok[0].get("memory_kind"),
        quality=curve[-1]["quality"],
        quality_per_seed=_per_seed(judge, final) if len(final) > 1 else None,
        curve=curve,
        samples=str((folders[0] / ok[0]["evaluations"][-1]["file"]).relative_to(out)),
    )
    return entry


def _samples(seed: int, path: Path) -> Samples:
    data = load_samples(path)
    return Samples(seed, data["subject"], data["subject_prompt"], data["class_images"], data["class_prompt"])


def _estimates(scores: dict) -> dict:
    return {key: (None if est is None else {k: _clean(v) for k, v in asdict(est).items()})
            for key, est in scores.items()}


def _per_seed(judge, samples: list[Samples]) -> dict[str, list]:
    """Each metric's value per seed (the spread the pooled interval does not show)."""
    scored = [judge.score([s]) for s in samples]
    return {key: [None if s[key] is None else _clean(s[key].value) for s in scored] for key in scored[0]}


def _clean(value):
    """Floats rounded for reading; NaN (a metric with nothing to measure) becomes null."""
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 4)
    return value


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 3)


def _spread(values: list) -> dict | None:
    """Mean, min and max over seeds (None when the row has no such cost, like the base model)."""
    if not values:
        return None
    return {"mean": _clean(float(np.mean(values))), "min": min(values), "max": max(values), "values": values}


def machine() -> dict:
    """What ran the comparison: CPU, cores, threads, memory and the accelerator if any."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(), "accelerator": "none"}
    if torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"sdtune": __version__}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
