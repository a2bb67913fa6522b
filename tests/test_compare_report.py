"""The compare report built from a small results.json: the markdown table holds every method and column,
the reading follows the numbers, and report.html shows every chart and image grid in headless Chromium."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from sdtune.compare.judge import TOY_METRICS
from sdtune.compare.kinds import RULE
from sdtune.compare.reading import reading
from sdtune.compare.report import write_report
from sdtune.compare.sampling import save_samples

PROMPTS = [f"a sks circle on a {c} background" for c in ("red", "orange", "black")]
CLASS_PROMPTS = [f"a {c} circle" for c in ("yellow", "purple", "red")]
METHOD_ROWS = ("dreambooth", "dreambooth-no-prior", "textual-inversion", "lora", "hypernetwork")


def est(value: float, half: float = 0.04) -> dict:
    return {"value": value, "low": value - half, "high": value + half, "n": 12}


def quality(subject: float, prompt: float, prior: float, diversity: float = 0.1) -> dict:
    return {"subject_fidelity": est(subject), "subject_fidelity_hard": est(subject / 2), "prompt_fidelity": est(prompt),
            "prior_preservation": est(prior), "diversity": est(diversity, 0.01)}


def spread(value: float, vary: float = 0.1) -> dict:
    return {"mean": value, "min": value * (1 - vary), "max": value * (1 + vary),
            "values": [value * (1 - vary), value * (1 + vary)]}


def method_row(name: str, subject: float, prior: float, wall: float, artifact: float, params: int) -> dict:
    method = "dreambooth" if name.startswith("dreambooth") else name
    q = quality(subject, 0.8, prior)
    half = quality(subject * 0.8, 0.8, prior)
    return {"name": name, "method": method, "steps": 100, "seeds_ok": 2, "errors": [],
            "settings": {"method": method, "train": {"steps": 100, "prior_preservation": name == "dreambooth"}},
            "cost": {"wall_time_s": spread(wall), "peak_memory_bytes": spread(6e8), "trainable_params": spread(params, 0),
                     "artifact_bytes": spread(artifact, 0)},
            "memory_kind": "peak_rss", "quality": q, "quality_per_seed": None,
            "curve": [{"step": 50, "seconds": wall / 2, "quality": half}, {"step": 100, "seconds": wall, "quality": q}],
            "samples": f"runs/{name}/seed-0/step-000100.npz"}


def fake_results() -> dict:
    base = {"name": "base", "method": None, "steps": 0, "seeds_ok": 2, "errors": [], "settings": {"data": {}},
            "cost": {k: None for k in ("wall_time_s", "peak_memory_bytes", "trainable_params", "artifact_bytes")},
            "quality": quality(0.05, 0.9, 0.85), "curve": [{"step": 0, "seconds": 0.0, "quality": quality(0.05, 0.9, 0.85)}],
            "samples": "runs/base/seed-0/step-000000.npz"}
    rows = [base,
            method_row("dreambooth", 0.85, 0.80, 120, 17e6, 4_310_980),
            method_row("dreambooth-no-prior", 0.88, 0.30, 100, 17e6, 4_310_980),
            method_row("textual-inversion", 0.40, 0.85, 50, 1.2e3, 128),
            method_row("lora", 0.80, 0.70, 60, 4.8e5, 110_080),
            method_row("hypernetwork", 0.07, 0.85, 70, 7e5, 173_376)]
    return {"sdtune_version": "0.1.0", "created": "2026-11-26T00:00:00+00:00", "profile": "builtin",
            "options": {"model": "builtin", "images": ""}, "subject": {"token": "sks", "class_word": "circle"},
            "seeds": [0, 1], "wall_time_s": 500.0,
            "evaluation": {"prompts": PROMPTS, "class_prompts": CLASS_PROMPTS, "sample_steps": 20},
            "metrics": [{"key": m.key, "label": m.label, "measures": m.measures} for m in TOY_METRICS],
            "missing_metrics": {}, "class_images": {"count": 24, "seconds": 30.0, "error": None}, "rows": rows,
            "machine": {"cpu": "test CPU", "torch_threads": 2, "accelerator": "none"}, "versions": {"torch": "2.x"}}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """The report written from fake_results() beside one evaluation .npz per row (random pictures)."""
    tmp_path = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for row in fake_results()["rows"]:
        n = 2 * len(PROMPTS)
        index = np.repeat(np.arange(len(PROMPTS)), 2)
        images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        path = tmp_path / row["samples"]
        path.parent.mkdir(parents=True)
        save_samples(path, (images, index), (images[::-1].copy(), index))
    write_report(tmp_path, fake_results())
    return tmp_path


def markdown_table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_markdown_table_has_every_method_and_column(report_dir):
    table = markdown_table((report_dir / "report.md").read_text())
    header, rows = table[0], table[2:]
    assert header == ["Method", "Steps", "Train time", "Peak memory", "Trainable params", "Artifact",
                      "Subject fidelity ↑", "Subject fidelity, two new factors ↑", "Prompt fidelity ↑",
                      "Prior preservation ↑", "Diversity ↑"]
    assert [r[0] for r in rows] == ["base (untouched)", *METHOD_ROWS]
    assert all(len(r) == len(header) for r in rows)
    lora = rows[4]
    assert lora[6] == "0.800 [0.760, 0.840]" and lora[4] == "110,080" and lora[5] == "468.8 KiB"  # as charts
    written = json.loads((report_dir / "results.json").read_text())
    assert written.pop("readings") == {"kinds_rule": RULE, "kinds": [], "checks": []}  # one subject, no kind
    assert written == fake_results()
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report_dir / "report.md").read_text()):
        assert (report_dir / figure).stat().st_size > 1000  # every linked chart was written beside the report


def test_reading_follows_the_numbers():
    text = "\n".join(reading(fake_results()))
    assert "dreambooth-no-prior (0.88), dreambooth (0.85) and lora (0.80) learn the subject best" in text
    assert "hypernetwork is not clearly above it" in text
    assert "Prior preservation on dreambooth" in text and ": clearly better." in text
    assert "dreambooth-no-prior (0.30) and lora (0.70) keep the class word's meaning less well than the base model" in text
    assert "**When the subject must look right**: dreambooth-no-prior, dreambooth and lora (tied); of these " \
           "dreambooth keeps the class word best (0.80)." in text
    assert "textual-inversion writes the smallest file" in text
    assert "**When the class word must keep its meaning**: textual-inversion" in text
    # Swap the numbers and the reading swaps with them: it is derived, not written in advance.
    swapped = copy.deepcopy(fake_results())
    swapped["rows"][5]["quality"] = {**quality(0.95, 0.8, 0.9), "subject_fidelity": est(0.97, 0.02)}
    swapped["rows"][5]["curve"][-1]["quality"] = swapped["rows"][5]["quality"]
    assert "**When the subject must look right**: hypernetwork." in "\n".join(reading(swapped))


def test_reading_says_when_quality_was_not_measured():
    results = fake_results()
    results["missing_metrics"] = {m["key"]: "no --dino-model given" for m in results["metrics"]}
    (line,) = reading(results)
    assert line.startswith("Quality was not measured (no --dino-model given)") and "trains fastest" in line


def test_html_report_shows_every_picture_in_chromium(report_dir, tmp_path_factory):
    from headless import chromium

    html_path = report_dir / "report.html"
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report_dir / "report.md").read_text())
    html = html_path.read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(sources) == len(figures) == 5 + 4 + 5 + 2  # quality bars, cost bars, curves, two image grids
    assert all(src.startswith("data:image/png;base64,") for src in sources)  # self-contained
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        browser.get(html_path.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        rows = browser.execute_script("return document.querySelectorAll('table tbody tr').length")
    assert len(images) == len(figures)
    assert all(done and width > 0 and height > 0 for done, width, height, _ in images), images
    assert rows == 6


def drawn_charts(monkeypatch, tmp_path) -> list:
    """Every matplotlib figure the report draws (captured as it becomes a PNG)."""
    from sdtune.compare import plots
    from sdtune.compare.report import build_blocks

    figures, to_png = [], plots._png
    monkeypatch.setattr(plots, "_png", lambda plt, fig: (figures.append(fig), fig.canvas.draw(), to_png(plt, fig))[2])
    build_blocks(fake_results(), tmp_path)  # no evaluation images here: charts only
    return figures


def colours_drawn(fig) -> dict[str, set[str]]:
    """Row name -> the colours its bars and lines have in one figure."""
    from matplotlib.colors import to_hex

    found: dict[str, set[str]] = {}
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_xticklabels()]
        if names and len(ax.patches) == len(names):
            for name, bar in zip(names, ax.patches):
                found.setdefault(name, set()).add(to_hex(bar.get_facecolor()))
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                found.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    return found


def test_each_row_has_one_colour_in_every_chart(monkeypatch, tmp_path):
    colours: dict[str, set[str]] = {}
    for fig in drawn_charts(monkeypatch, tmp_path):
        for name, seen in colours_drawn(fig).items():
            colours.setdefault(name, set()).update(seen)
    assert set(colours) == {"base", *METHOD_ROWS}
    assert all(len(seen) == 1 for seen in colours.values()), colours  # quality, cost and curve charts agree
    assert len({c for seen in colours.values() for c in seen}) == len(colours)  # and rows differ from each other


def test_memory_and_file_size_charts_use_human_units_without_an_offset(monkeypatch, tmp_path):
    from sdtune.compare.report import cost_series

    results = fake_results()
    title, bars = cost_series(results, "peak_memory_bytes", "Peak memory")
    assert title == "Peak memory (MiB)" and all(abs(mean - 6e8 / 2**20) < 1e-6 for _, mean, _, _ in bars)
    assert cost_series(results, "artifact_bytes", "Artifact")[0] == "Artifact (MiB)"  # largest: 17 MB
    for fig in drawn_charts(monkeypatch, tmp_path):
        for ax in fig.axes:
            assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e8" above any axis
            if "memory" in ax.get_title().lower():
                assert ax.get_ylabel() == "Peak memory (MiB)" and max(p.get_height() for p in ax.patches) < 1024


def test_which_method_when_has_a_headline_and_few_bullets(report_dir):
    from pathlib import Path

    from sdtune.compare.reading import MAX_BULLETS, headline

    assert headline(fake_results()).startswith("**dreambooth-no-prior** learns the subject best (subject fidelity "
                                               "0.88 [0.84, 0.92]) for 100 s of training, 572.2 MiB of peak memory")
    assert "dreambooth and lora are tied with it" in headline(fake_results())
    section = (report_dir / "report.md").read_text().split("## Which method when\n\n")[1].split("\n\n## ")[0]
    first, bullets = section.split("\n\n", 1)
    assert first == headline(fake_results())  # the headline opens the section, before any bullet
    assert 3 <= len(bullets.splitlines()) <= MAX_BULLETS == 6
    committed = json.loads((Path(__file__).parents[1] / "docs" / "compare" / "results.json").read_text())
    best = max((r for r in committed["rows"] if r["method"]), key=lambda r: r["quality"]["subject_fidelity"]["value"])
    assert len(reading(committed)) <= MAX_BULLETS and headline(committed).startswith(f"**{best['name']}** learns")


def test_small_file_pick_needs_half_the_best_subject_score():
    text = "\n".join(reading(fake_results()))
    # textual-inversion writes the smallest file but reaches 45% of the best subject score: lora (91%) is the pick.
    assert "**When the file must be small**: lora (468.8 KiB, 91% of the best subject score); textual-inversion " \
           "costs less (1.2 KiB) but reaches only 45%." in text
    assert "reaching 50% of it" in text  # the rule is stated in the report
    results = fake_results()
    results["rows"][3]["quality"]["subject_fidelity"] = est(0.45)  # now 51% of the best: it qualifies
    assert "**When the file must be small**: textual-inversion (1.2 KiB, 51%" in "\n".join(reading(results))


def test_report_says_where_each_rows_files_are_and_how_to_use_them(report_dir):
    section = (report_dir / "report.md").read_text().split("## Trained files and how to use them\n\n")[1]
    items = [line for line in section.split("\n\n## ")[0].splitlines() if line.startswith("- ")]
    assert [item.split("**")[1] for item in items] == list(METHOD_ROWS)  # every trained row, not the base
    dreambooth, lora = items[0], items[3]
    assert "`sdtune generate --model runs/dreambooth/seed-0/artifact/dreambooth --prompt" in dreambooth
    assert lora.startswith("- **lora**: `runs/lora/seed-0/artifact/lora.safetensors` (not beside this copy")
    assert "--artifacts runs/lora/seed-0/artifact --prompt \"a sks ... <lora:lora:1>\" --output lora.png`" in lora


def test_report_rebuilt_from_results_json_keeps_the_earlier_image_grids(report_dir, tmp_path):
    import shutil

    write_report(tmp_path, fake_results())  # no evaluation images and no earlier grids: it says so
    assert "No evaluation images were found beside this report." in (tmp_path / "report.md").read_text()
    for kind in ("subject", "class"):
        shutil.copy(report_dir / f"charts/grid_{kind}.png", tmp_path / f"charts/grid_{kind}.png")
    write_report(tmp_path, fake_results())
    text = (tmp_path / "report.md").read_text()
    assert "](charts/grid_subject.png)" in text and "](charts/grid_class.png)" in text
    assert (tmp_path / "charts/grid_class.png").read_bytes() == (report_dir / "charts/grid_class.png").read_bytes()
