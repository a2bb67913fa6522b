"""Where each row's trained files are (relative to the report) and the `sdtune generate` command that uses
them: the method's own `usage` text, so the report and `sdtune train` say the same thing."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def run_folder(row: dict, seed: int) -> PurePosixPath:
    """A row's artifact folder for one seed, relative to the report (the runner's [subjects/NAME/]runs/ROW/
    seed-S/artifact)."""
    return PurePosixPath(row.get("folder") or f"runs/{row['name']}", f"seed-{seed}", "artifact")


def subject_parts(results: dict) -> list[dict]:
    """The comparison's subjects, each with its rows (results.json from before several subjects: one)."""
    return results.get("subjects") or [{"name": None, "rows": results["rows"], "token": results["subject"]["token"]}]


def trained_files(results: dict, out: Path) -> list[str]:
    """One item per trained row (of each subject): its files for the first seed and the command that
    generates with them."""
    seeds, parts = results["seeds"], subject_parts(results)
    items = []
    for part in parts:
        for row in part["rows"]:
            if not row["method"] or not row.get("seeds_ok"):
                continue
            folder = run_folder(row, seeds[0])
            method = _method(row)
            files = ", ".join(f"`{folder / name}`" for name in method.output_files(row["name"], None))
            command = method.usage(results["options"]["model"], Path(folder), row["name"],
                                   row["settings"].get("token", part["token"]))
            missing = "" if (Path(out) / folder).is_dir() else " (not beside this copy of the report)"
            label = f"{part['name']}: {row['name']}" if len(parts) > 1 else row["name"]
            items.append(f"**{label}**: {files}{missing}; generate with `sdtune generate {command} "
                         f"--output {row['name']}.png`")
    return items


def _method(row: dict):
    """The row's method object as it was configured (its file names can depend on the settings)."""
    from .. import methods
    from ..config import build

    cls = methods.get(row["method"])
    cfg = build(cls.config_class, row["settings"].get(row["method"], {}), row["method"])
    return cls(cfg)


def where_text(results: dict) -> str:
    """The paragraph before the list: where the files are and from which folder the commands run."""
    seeds = results["seeds"]
    others = f" (the other seeds' in seed-{', seed-'.join(map(str, seeds[1:]))})" if len(seeds) > 1 else ""
    return (f"Each row's trained files for seed {seeds[0]}{others}, relative to this report; run the commands "
            "from this report's folder (`...` in a prompt: your own words).")
