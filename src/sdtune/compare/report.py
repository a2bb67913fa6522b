"""report.md and report.html (the same document; the HTML embeds every picture) plus results.json and the
charts as PNG files, all written atomically into the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from ..artifacts import atomic_write_via
from ..bench_sizes import byte_unit, human_bytes
from . import plots
from .checks import HALF_WAY, LEARNABLE, benchmark_checks
from .document import Block, Bullets, Code, Figure, Heading, Paragraph, Table, to_html, to_markdown
from .kinds import RULE, kind_readings
from .reading import estimate_of, headline, reading
from .sampling import load_samples
from .usage import subject_parts, trained_files, where_text

COSTS = (("wall_time_s", "Train time", False), ("peak_memory_bytes", "Peak memory", False),
         ("trainable_params", "Trainable params", True), ("artifact_bytes", "Artifact", True))
# Subject fidelity per prompt type, in the order a subject's table shows them: the headline first, the hard
# column beside it.
TYPE_COLUMNS = (("one_factor", "one new factor"), ("two_factors", "two new factors"),
                ("caption", "training captions"), ("identifier", "identifier alone"),
                ("held_out_class", "unseen classes"), ("custom", "other prompts"))
GRID_TYPES = ("one_factor", "held_out_class", "custom")  # the subject prompts an image grid shows


def write_report(out: Path, results: dict) -> Path:
    """Write results.json, charts/*.png, report.md and report.html into `out`; return report.html."""
    out = Path(out)
    results = {**results, "readings": derived_readings(results)}  # recomputed: never an earlier file's words
    blocks = build_blocks(results, out)
    _write(out / "results.json", json.dumps(results, indent=1))
    for block in blocks:
        if isinstance(block, Figure):
            atomic_write_via(out / block.file, lambda tmp, data=block.png: tmp.write_bytes(data))
    _write(out / "report.md", to_markdown(blocks))
    return _write(out / "report.html", to_html(blocks, title(results)))


def _write(path: Path, text: str) -> Path:
    return atomic_write_via(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def title(results: dict) -> str:
    """'sdtune compare: LoRA, Textual Inversion, ... on one subject': the methods of the compared rows."""
    from ..methods import listing, registry

    registered = registry()
    names = dict.fromkeys(row["method"] for row in results["rows"] if row["method"])
    labels = [registered[name].label if name in registered else name for name in names]
    count = len(subject_parts(results))
    return f"sdtune compare: {listing(labels)} on {'one subject' if count == 1 else f'{count} subjects'}"


def build_blocks(results: dict, out: Path) -> list[Block]:
    """The report, top to bottom: what ran, the table, the reading, charts, curves, images, trained files,
    settings, machine."""
    metrics, parts = results["metrics"], subject_parts(results)
    blocks: list[Block] = [Heading(1, title(results)), Paragraph(_summary(results)), Heading(2, "Results"),
                           _table(results), Bullets(_notes(results))]
    if any(row.get("quality_by_type") for part in parts for row in part["rows"]):
        blocks += _type_tables(results, parts)
    blocks += [Heading(2, "Which method when"), Paragraph(headline(results)), Bullets(reading(results))]
    blocks += _kind_blocks(results, len(parts) > 1)
    blocks += _check_blocks(benchmark_checks(results))
    blocks.append(Heading(2, "Quality and cost per method"))
    if len(parts) > 1:
        blocks.append(_per_subject_bars(results, parts))
    blocks += [_quality_bar(results, m) for m in metrics if m["key"] not in results["missing_metrics"]]
    blocks += [_cost_bar(results, key, label, log) for key, label, log in COSTS]
    blocks += [Heading(2, "Quality against training budget"),
               Paragraph("Each method evaluated along its run (fewer images at the earlier points): the method and "
                         "its budget are separate questions. Bands are 95% intervals; dashed: the base model.")]
    blocks += [_curves(results, m) for m in metrics if m["key"] not in results["missing_metrics"]]
    blocks += [Heading(2, "Images"), *_grids(results, out)]
    blocks += [Heading(2, "Trained files and how to use them"), Paragraph(where_text(results)),
               Bullets(trained_files(results, out))]
    blocks += [Heading(2, "Settings"), Code(yaml.safe_dump(_settings(results), sort_keys=False, width=110)),
               Heading(2, "Machine and versions"), Bullets(_machine(results))]
    return blocks


def derived_readings(results: dict) -> dict:
    """The readings per kind of subject and the benchmark checks as data (what results.json holds)."""
    return {"kinds_rule": RULE, "kinds": kind_readings(results), "checks": benchmark_checks(results)}


def _kind_blocks(results: dict, pooled: bool) -> list[Block]:
    found = kind_readings(results)
    if not found:
        return []
    lead = "The headline and bullets above read the pooled rows. " if pooled else ""
    return [Heading(3, "Per kind of subject"), Paragraph(lead + RULE), Bullets([k["text"] for k in found])]


CHECK_HEADER = ["Subject", "Check", "Row", "Subject fidelity: one new factor", "Floor (base model)", "Ceiling",
                "Half-way mark", "Verdict"]


def _check_blocks(checks: list[dict]) -> list[Block]:
    """The benchmark's bars per subject, pass or fail with the numbers (computed here, never asserted)."""
    if not checks:
        return []
    lines = [[c["subject"] + (f" ({c['kind']})" if c["kind"] else ""), c["check"], c["row"] or "–",
              _estimate(c["estimate"]), _estimate(c["floor"]), _estimate(c["ceiling"]) if c["ceiling"] else "–",
              "–" if c["half_way"] is None else f"{c['half_way']:.3f}",
              ("not checked" if c["passed"] is None else "pass" if c["passed"] else "**fail**")
              + (f": {'; '.join(c['reasons'])}" if c["reasons"] else "")] for c in checks]
    passed = sum(c["passed"] is True for c in checks)
    return [Heading(2, "Benchmark checks"),
            Paragraph(f"The benchmark's own bars, computed from the numbers above (a failure is shown, not raised): "
                      f"each subject's best row reaches at least {HALF_WAY:.0%} of the way from the floor (the base "
                      "model) to the ceiling (the subject's renders through the VAE) on one-new-factor subject "
                      "fidelity, with its 95% interval above the base model's; and each method lies above the base "
                      f"model on the kind of subject it is made for. {passed} of {len(checks)} pass."),
            Table(CHECK_HEADER, lines)]


def _summary(results: dict) -> str:
    opts, subject = results["options"], results["subject"]
    words = f"token `{subject['token']}`, class word `{subject['class_word']}`"
    where = f"the images in `{opts['images']}` ({words})" if opts.get("images") else _subjects_text(results, words)
    seeds, machine = results["seeds"], results["machine"]
    return (f"Model `{opts['model']}`, {where}; "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}); the whole comparison "
            f"took {results['wall_time_s']:.0f} s{_reused(results)} on {machine['cpu']} ({_lanes_text(machine)}, "
            f"accelerator: {machine['accelerator']}); {results['created']}.")


def _lanes_text(machine: dict) -> str:
    """"2 runs at a time, 1 thread each" (older results: only the thread count)."""
    threads, runs = machine["torch_threads"], machine.get("runs_at_once", 1)
    each = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{runs} runs at a time, {each} each" if runs > 1 else each


def _subjects_text(results: dict, words: str) -> str:
    """Which builtin subjects ran, and how many there are (`words`: the token and class word of one)."""
    from ..toyworld.catalogue import SUBJECTS

    parts = [p for p in subject_parts(results) if p["name"]]
    if not parts:
        return f"the builtin toy-world subject ({words})"
    names = ", ".join(f"{p['name']} ({p['kind']})" for p in parts)
    if len(parts) == 1:
        return (f"the builtin subject {parts[0]['name']} ({parts[0]['kind']}; {words}; one of {len(SUBJECTS)}: "
                "`--subjects all` runs every one)")
    tokens = " or ".join(sorted({f"`{p['token']}`" for p in parts}))
    return (f"{len(parts)} builtin subjects, {names}, every row trained on each with the same recipe (the first "
            f"table pools them, each subject weighing the same; token {tokens})")


def _reused(results: dict) -> str:
    reused = results.get("runs_reused", 0)
    return (f" ({reused} of {results['runs']} runs reused from an earlier invocation; their times are those "
            "measured when they ran, on whatever else that machine was doing then)") if reused else ""


def _estimate(est: dict | None) -> str:
    if not est or est["value"] is None:
        return "n/a"
    return f"{est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"


def _cost(spread: dict | None, key: str) -> str:
    if not spread:
        return "–"
    fmt = {"wall_time_s": lambda v: f"{v:.1f} s", "trainable_params": lambda v: f"{v:,.0f}"}.get(key, human_bytes)
    text = fmt(spread["mean"])
    return text + (f" ({fmt(spread['min'])}–{fmt(spread['max'])})" if spread["min"] != spread["max"] else "")


def _table(results: dict) -> Table:
    metrics = results["metrics"]
    header = ["Method", "Steps", *(label for _, label, _ in COSTS), *(m["label"] + " ↑" for m in metrics)]
    rows = []
    for row in results["rows"]:
        name = "base (untouched)" if row["method"] is None else row["name"]
        if not row.get("quality"):
            rows.append([name, str(row["steps"]), "failed"] + [""] * (len(header) - 3))
            continue
        costs = [_cost((row.get("cost") or {}).get(key), key) for key, _, _ in COSTS]
        rows.append([name, str(row["steps"]), *costs, *(_estimate(row["quality"].get(m["key"])) for m in metrics)])
    return Table(header, rows)


def _type_tables(results: dict, parts: list[dict]) -> list[Block]:
    """Subject fidelity per prompt type: pooled over the subjects (when several), then each subject's own with
    its floor (the base model) and ceiling (its renders through the VAE)."""
    blocks: list[Block] = [Heading(2, "Per prompt type")]
    blocks.append(Paragraph(
        "Subject fidelity by what the evaluation prompt changes from the training captions: one new background, "
        "position or size (the headline, as in DreamBench; a size only where it is not part of the subject, so never "
        "for a subject of one's own), two at once (the hard column), nothing (the captions "
        "themselves; the identifier alone) and, for a style, classes its images never show. Prompt fidelity "
        "and prior preservation as in the first table. Values [95% interval]; pooled values weigh each subject "
        "that has the prompt type the same."))
    if len(parts) > 1:
        blocks += [Heading(3, "Pooled over the subjects"), _type_table(results["rows"], None)]
    for part in parts:
        heading = part["name"] or "subject"
        blocks.append(Heading(3, f"{heading} ({part['kind']})" if part.get("kind") else heading))
        if part.get("description"):
            blocks.append(Paragraph(f"{part['description'][0].upper()}{part['description'][1:]}; class word "
                                    f"`{part['class_word']}`. The base row is the floor; the ceiling is the subject "
                                    "drawn as each prompt asks, through the base model's VAE."))
        blocks.append(_type_table(part["rows"], part.get("ceiling")))
    return blocks


def _type_table(rows: list[dict], ceiling: dict | None) -> Table:
    entries = [("base (untouched)" if r["method"] is None else r["name"], r) for r in rows]
    entries += [("ceiling (renders through the VAE)", ceiling)] if ceiling else []
    present = [(k, label) for k, label in TYPE_COLUMNS
               if any(k in (e.get("quality_by_type") or {}) for _, e in entries if e)]
    header = ["Method", *(f"Subject fidelity: {label} ↑" for _, label in present), "Prompt fidelity ↑",
              "Prior preservation ↑"]
    lines = []
    for name, entry in entries:
        if not entry.get("quality"):
            lines.append([name, "failed"] + [""] * (len(header) - 2))
            continue
        by_type, quality = entry.get("quality_by_type") or {}, entry["quality"]
        lines.append([name, *(_estimate((by_type.get(k) or {}).get("subject_fidelity")) for k, _ in present),
                      _estimate(quality.get("prompt_fidelity")), _estimate(quality.get("prior_preservation"))])
    return Table(header, lines)


def _notes(results: dict) -> list[str]:
    notes = [f"**{m['label']}**: {m['measures']}." for m in results["metrics"]]
    notes += [f"**{_label(results, key)}** not measured: {why}." for key, why in results["missing_metrics"].items()]
    counts = [e["n"] for r in results["rows"] for e in (r.get("quality") or {}).values() if e]
    notes.append("Quality: value [95% bootstrap interval] over every evaluation image of every seed"
                 + (f" ({counts[0]} images per row)" if counts else "") + "; costs: mean over seeds (min–max). Peak "
                 "memory is the training process's peak resident set on CPU, CUDA peak allocated on GPU; each run "
                 "trains in its own process.")
    if results.get("class_images") and results["class_images"].get("count"):
        ci = results["class_images"]
        notes.append(f"Prior preservation trains on {ci['count']} class images the base model generated once "
                     f"({ci['seconds']:.0f} s, not in any row's train time).")
    notes += [f"**{r['name']}** failed: {e}" for r in results["rows"] for e in r.get("errors", [])]
    return notes


def _label(results: dict, key: str) -> str:
    return next((m["label"] for m in results["metrics"] if m["key"] == key), key)


def _colours(results: dict) -> dict[str, str]:
    return plots.colour_table([r["name"] for r in results["rows"]])


def _quality_bar(results: dict, metric: dict) -> Figure:
    bars = [(r["name"], *_triple(r["quality"].get(metric["key"]))) for r in results["rows"] if r.get("quality")]
    chart = plots.bar_chart(f"{metric['label']} (higher is better; 95% intervals)", bars, _colours(results))
    return Figure(metric["label"], f"charts/{metric['key']}.png", chart)


def _per_subject_bars(results: dict, parts: list[dict]) -> Figure:
    """Each row's headline subject fidelity on each subject beside its floor (the base row) and ceiling."""
    names = [r["name"] for r in results["rows"]]
    series = [(name, [_triple(estimate_of(next(r for r in p["rows"] if r["name"] == name), "subject_fidelity"))
                      for p in parts]) for name in names]
    ceilings = [_triple(estimate_of(p.get("ceiling"), "subject_fidelity"))[0] for p in parts]
    marks = {c["subject"]: c["half_way"] for c in benchmark_checks(results) if c["check"] == LEARNABLE}
    chart = plots.grouped_bar_chart("Subject fidelity, one new factor, per subject (95% intervals; base: the floor)",
                                    [p["name"] for p in parts], series, _colours(results),
                                    [("ceiling", "--", ceilings),
                                     ("half-way mark", ":", [marks.get(p["name"]) for p in parts])])
    return Figure("Subject fidelity per subject", "charts/subject_fidelity_per_subject.png", chart)


def _triple(est: dict | None) -> tuple:
    return (None, None, None) if not est else (est["value"], est["low"], est["high"])


BYTE_COSTS = ("peak_memory_bytes", "artifact_bytes")


def cost_series(results: dict, key: str, label: str) -> tuple[str, list[tuple]]:
    """(title with its unit, bars as (name, mean, min, max)) of one cost; byte counts in KiB/MiB/GiB."""
    bars = [(r["name"], s["mean"], s["min"], s["max"]) for r in results["rows"]
            if (s := (r.get("cost") or {}).get(key))]
    if key not in BYTE_COSTS:
        return {"wall_time_s": "Train time (s)"}.get(key, label), bars
    divisor, unit = byte_unit(max((b[3] for b in bars), default=1))
    return f"{label} ({unit})", [(name, *(v / divisor for v in values)) for name, *values in bars]


def _cost_bar(results: dict, key: str, label: str, log: bool) -> Figure:
    title, bars = cost_series(results, key, label)
    chart = plots.bar_chart(title + (", log scale" if log else ""), bars, _colours(results), ylabel=title, log=log)
    return Figure(label, f"charts/cost_{key}.png", chart)


def _curves(results: dict, metric: dict) -> Figure:
    key = metric["key"]
    base = next((r for r in results["rows"] if r["method"] is None and r.get("quality")), None)
    lines = [(r["name"], [(p["step"], p["seconds"], *_triple(p["quality"].get(key))) for p in r["curve"]])
             for r in results["rows"] if r["method"] and r.get("curve")]
    chart = plots.curve_chart(metric["label"], lines, _triple(base["quality"].get(key)) if base else None,
                              _colours(results))
    return Figure(f"{metric['label']} along the run", f"charts/curve_{key}.png", chart)


# (kind, images and prompt-index keys of a samples file, title) of the two image grids.
GRIDS = (("subject", "subject", "subject_prompt", "Subject prompts (the subject's token in a new scene)"),
         ("class", "class_images", "class_prompt", "Class prompts (prior preservation: no token)"))


def _grids(results: dict, out: Path) -> list[Block]:
    """Per subject, rows x evaluation prompts (first seed, last step), for the subject prompts (those of the
    headline types) and the class prompts."""
    parts = subject_parts(results)
    blocks = [block for part in parts for block in _subject_grids(results, part, out, len(parts) > 1)]
    return blocks or [Paragraph("No evaluation images were found beside this report.")]


def _subject_grids(results: dict, part: dict, out: Path, named: bool) -> list[Block]:
    rows = [r for r in part["rows"] if r.get("samples") and (out / r["samples"]).is_file()]
    suffix, prefix = (f"_{part['name']}", f"{part['name']}: ") if part["name"] else ("", "")
    titles = [(kind, f"{prefix if named else ''}{title}") for kind, _, _, title in GRIDS]
    if not rows:
        return _earlier_grids(out, titles, suffix)
    evaluation = part.get("evaluation") or results["evaluation"]
    types = evaluation.get("prompt_types")
    shown = {"subject": [j for j, kind in enumerate(types or []) if kind in GRID_TYPES] if types
             else list(range(len(evaluation["prompts"]))),
             "class": list(range(len(evaluation["class_prompts"])))}
    samples = [load_samples(out / r["samples"]) for r in rows]
    names = [r["name"] for r in rows]
    ceiling = (part.get("ceiling") or {}).get("samples")
    if ceiling and (out / ceiling).is_file():  # the subject prompts' last row: what a perfect method would show
        ceiling_rows = ([load_samples(out / ceiling)], ["ceiling"])
    else:
        ceiling_rows = ([], [])
    blocks: list[Block] = []
    for (kind, images_key, index_key, _), (_, title) in zip(GRIDS, titles):
        prompts = evaluation["prompts" if kind == "subject" else "class_prompts"]
        extra_samples, extra_names = ceiling_rows if kind == "subject" else ([], [])
        cells = [[_cell(s[images_key], s[index_key], j) for j in shown[kind]] for s in samples + extra_samples]
        chart = plots.image_grid(title, names + extra_names, [prompts[j] for j in shown[kind]], cells)
        blocks.append(Figure(title, f"charts/grid_{kind}{suffix}.png", chart))
    return blocks


def _earlier_grids(out: Path, titles: list[tuple[str, str]], suffix: str) -> list[Block]:
    """The grids an earlier report left beside this one, when the evaluation images are gone (a report
    rebuilt from results.json alone, as the committed docs/compare one is)."""
    found = [(title, out / f"charts/grid_{kind}{suffix}.png") for kind, title in titles]
    return [Figure(title, str(path.relative_to(out)), path.read_bytes()) for title, path in found if path.is_file()]


def _cell(images: np.ndarray, index: np.ndarray, prompt: int) -> np.ndarray | None:
    picked = images[index == prompt][:4]
    return plots.mosaic(picked) if len(picked) else None


def _settings(results: dict) -> dict:
    listed = ("prompts", "class_prompts", "prompt_types", "curve_prompts")
    shared = {"evaluation": {k: v for k, v in results["evaluation"].items() if k not in listed}}
    return {**shared, **{r["name"]: r["settings"] for r in results["rows"]}}


def _machine(results: dict) -> list[str]:
    machine, versions = results["machine"], results["versions"]
    items = [f"{k.replace('_', ' ')}: {v}" for k, v in machine.items()]
    items.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    return items
