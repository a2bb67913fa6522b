"""results.json: per subject and row its settings, costs (mean and range over seeds), quality at the end (also
per prompt type) and along the run (pooled over seeds, with 95% intervals), the subject's floor and ceiling;
rows pooled over the subjects; plus the machine and library versions that produced it."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__
from .judge import Samples, ToyJudge
from .sampling import fill, load_samples, save_samples

COSTS = ("wall_time_s", "peak_memory_bytes", "trainable_params", "artifact_bytes")
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "matplotlib")


def assemble(parts: list, options: dict, runs: dict[tuple[str, str, int], dict], out: Path, seconds: float,
             lanes=None) -> dict:
    """The whole comparison as plain data (what results.json holds and the report is built from): per subject
    its rows, floor (the base model) and ceiling; `rows` are the first subject's, or pooled over several."""
    seeds = sorted({seed for _, _, seed in runs})
    pool = len(parts) > 1
    made = [_subject_entry(part, runs, seeds, out, pool) for part in parts]
    subjects = [entry for entry, _ in made]
    first, judges = parts[0], [part.judge for part in parts]
    return {
        "sdtune_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "profile": first.plan.profile,
        "subject": {"token": first.plan.token, "class_word": first.plan.class_word},
        "seeds": seeds,
        "wall_time_s": round(seconds, 1),
        "runs_reused": sum(1 for run in runs.values() if run.get("reused")),
        "runs": len(runs),
        "evaluation": subjects[0]["evaluation"],
        "metrics": [asdict(m) for m in first.judge.metrics],
        "missing_metrics": {k: v for judge in judges for k, v in judge.missing.items()},
        "class_images": subjects[0]["class_images"],
        "subjects": subjects,
        "rows": _pooled_rows(subjects, [evidence for _, evidence in made]) if pool else subjects[0]["rows"],
        "machine": machine(lanes),
        "versions": versions(),
    }


def _subject_entry(part, runs: dict, seeds: list[int], out: Path, pool: bool) -> tuple[dict, list]:
    """(one subject's part of results.json, each row's evidence per evaluation point when pooling)."""
    plan, judge = part.plan, part.judge
    made = [_row(row, [runs[(part.name, row.name, s)] for s in seeds], judge, out, plan.rows[0].data, part.root,
                 pool) for row in plan.rows]
    rows = [entry for entry, _ in made]
    class_run = runs.get((part.name, "class-images", 0), {})
    evaluation = {**asdict(plan.evaluation), "prompts": fill(plan.evaluation.prompts, plan.token, plan.class_word),
                  "class_prompts": fill(plan.evaluation.class_prompts, plan.token, plan.class_word)}
    entry = {"name": part.name or None, "root": part.root, "token": plan.token, "class_word": plan.class_word,
             "evaluation": evaluation,
             "class_images": {k: class_run.get(k) for k in ("count", "seconds", "error")} if class_run else None,
             "rows": rows, "floor": {k: rows[0].get(k) for k in ("quality", "quality_by_type")}}
    if part.subject is not None:
        entry.update(kind=part.subject.kind, description=part.subject.description)
    if isinstance(judge, ToyJudge):  # a builtin subject's, or one's own on the builtin model
        evaluation["prompt_types"] = judge.types
    if part.ceiling:
        entry["ceiling"] = {"quality": _estimates(judge.score(part.ceiling)),
                            "quality_by_type": _by_type(judge.by_type(part.ceiling)),
                            "samples": _save_ceiling(part.ceiling, out, part.root)}
    return entry, [evidence for _, evidence in made]


def _save_ceiling(ceiling: list[Samples], out: Path, root: str) -> str:
    """The ceiling's images beside the subject's runs (the image grids show them as their last row); returns
    their path relative to the comparison folder."""
    first = ceiling[0]
    path = save_samples(out / root / "ceiling.npz", (first.subject, first.subject_prompt),
                        (first.class_images, first.class_prompt))
    return str(path.relative_to(out))


def _row(row, seed_runs: list[dict], judge, out: Path, shared: dict, root: str = "", pool: bool = False):
    """(the row's entry, its evidence per evaluation point when pooling over subjects, else None)."""
    ok = [run for run in seed_runs if "error" not in run]
    entry = {"name": row.name, "method": row.method, "steps": row.steps, "settings": row.settings(shared),
             "seeds_ok": len(ok), "errors": sorted({run["error"] for run in seed_runs if "error" in run})}
    if root:
        entry["folder"] = f"{root}/runs/{row.name}"
    if not ok:
        return entry, None
    folders = [out / root / "runs" / row.name / f"seed-{run['seed']}" for run in ok]
    curve, evidence = [], []
    for point, evaluation in enumerate(ok[0]["evaluations"]):
        samples = [_samples(run["seed"], folder / run["evaluations"][point]["file"]) for run, folder in zip(ok, folders)]
        curve.append({"step": evaluation["step"],
                      "seconds": _mean([run["evaluations"][point]["seconds"] for run in ok]),
                      "quality": _estimates(judge.score(samples))})
        if pool:
            evidence.append(judge.evidence(samples))
    final = [_samples(run["seed"], folder / run["evaluations"][-1]["file"]) for run, folder in zip(ok, folders)]
    entry.update(
        cost={key: _spread([run[key] for run in ok if run.get(key) is not None]) for key in COSTS},
        memory_kind=ok[0].get("memory_kind"),
        quality=curve[-1]["quality"],
        quality_per_seed=_per_seed(judge, final) if len(final) > 1 else None,
        curve=curve,
        samples=str((folders[0] / ok[0]["evaluations"][-1]["file"]).relative_to(out)),
    )
    by_type = judge.by_type(final)
    if by_type:
        entry["quality_by_type"] = _by_type(by_type)
    return entry, evidence if pool else None


def _pooled_rows(subjects: list[dict], evidence: list[list]) -> list[dict]:
    """Each row pooled over the subjects (each weighs the same): costs over every run, quality and its curve
    from every subject's images. A row that failed on some subject is not pooled (its errors say where)."""
    from .judge import estimates, pooled_by_type

    pooled = []
    for k, first in enumerate(subjects[0]["rows"]):
        per = [subject["rows"][k] for subject in subjects]
        entry = {key: first[key] for key in ("name", "method", "steps", "settings")}
        entry.update(seeds_ok=min(r["seeds_ok"] for r in per),
                     errors=sorted({f"{s['name']}: {e}" for s, r in zip(subjects, per) for e in r["errors"]}))
        points = [subject_evidence[k] for subject_evidence in evidence]
        if any(p is None for p in points) or len({len(p) for p in points}) != 1:
            pooled.append(entry)
            continue
        curve = [{"step": r0["step"], "seconds": _mean([r["curve"][i]["seconds"] for r in per]),
                  "quality": _estimates(estimates([p[i] for p in points]))} for i, r0 in enumerate(first["curve"])]
        entry.update(cost={key: _spread([v for r in per if r["cost"][key] for v in r["cost"][key]["values"]])
                           for key in COSTS},
                     memory_kind=first.get("memory_kind"), quality=curve[-1]["quality"], quality_per_seed=None,
                     curve=curve, quality_by_type=_by_type(pooled_by_type([p[-1] for p in points])))
        pooled.append(entry)
    return pooled


def _samples(seed: int, path: Path) -> Samples:
    data = load_samples(path)
    return Samples(seed, data["subject"], data["subject_prompt"], data["class_images"], data["class_prompt"])


def _estimates(scores: dict) -> dict:
    return {key: (None if est is None else {k: _clean(v) for k, v in asdict(est).items()})
            for key, est in scores.items()}


def _by_type(by_type: dict) -> dict:
    return {kind: _estimates(found) for kind, found in by_type.items()}


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


def machine(lanes=None) -> dict:
    """What ran the comparison: CPU, cores, runs at once and threads per run (`lanes`, scheduling.Lanes; default
    one run on torch's threads), memory and the accelerator if any."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "runs_at_once": lanes.count if lanes else 1,
            "torch_threads": lanes.threads if lanes else torch.get_num_threads(),
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
