"""`sdtune compare` on several builtin subjects: every row trained per subject with the same recipe, quality per
prompt type with intervals, each subject's floor and ceiling, rows pooled over the subjects, one table per
subject; and the default comparison keeps the first subject's prompts (and so its numbers) where they were."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdtune.cli import main
from sdtune.compare.judge import Samples, ToyJudge
from sdtune.compare.runner import CompareOptions, _part
from sdtune.compare.sampling import fill, load_samples, sample
from sdtune.toyworld import subject as first_subject
from sdtune.toyworld.catalogue import get_subject
from sdtune.toyworld.metrics import bootstrap_mean, stratified_mean
from sdtune.toyworld.world import Scene, render_batch, scenes_to_batch

TINY = """
eval: {sample_steps: 2, images_per_prompt: 1, curve_points: 1}
rows: {textual-inversion: {train: {steps: 2, batch_size: 1}}}
"""


def _hwc(images) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    """A tiny comparison on a new look and the style (Textual Inversion, 2 steps, 2 sampling steps)."""
    tmp = tmp_path_factory.mktemp("subjects")
    config = tmp / "tiny.yaml"
    config.write_text(TINY)
    out = tmp / "out"
    assert main(["compare", "--subjects", "quartered-circle,zebra", "--methods", "textual-inversion",
                 "--config", str(config), "--output", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_each_subject_has_its_rows_per_prompt_type_with_floor_and_ceiling(two_subjects):
    out, results = two_subjects
    circle, zebra = results["subjects"]
    assert (circle["name"], circle["kind"], zebra["name"], zebra["kind"]) == \
        ("quartered-circle", "new look", "zebra", "style")
    for part in (circle, zebra):
        subj = get_subject(part["name"])
        base, ti = part["rows"]
        assert (base["method"], ti["name"]) == (None, "textual-inversion") and ti["seeds_ok"] == 1
        assert (out / part["root"] / "runs" / "textual-inversion" / "seed-0" / "result.json").is_file()
        assert set(ti["quality_by_type"]) == set(subj.prompts)  # every type, the class prompts' too
        for kind, found in ti["quality_by_type"].items():
            est = found["prior_preservation" if kind == "class" else "subject_fidelity"]
            assert est["low"] <= est["value"] <= est["high"] and est["n"] == len(subj.prompts[kind])
        # The headline reads the one-new-factor prompts, the hard column the two-factor ones.
        assert ti["quality"]["subject_fidelity"] == ti["quality_by_type"]["one_factor"]["subject_fidelity"]
        assert ti["quality"]["subject_fidelity_hard"] == ti["quality_by_type"]["two_factors"]["subject_fidelity"]
        assert part["floor"]["quality_by_type"] == base["quality_by_type"]
        ceiling = part["ceiling"]["quality_by_type"]
        assert set(ceiling) == set(subj.prompts) - {"class"}
        assert all(c["subject_fidelity"]["value"] > 0.5 and c["prompt_fidelity"]["value"] >= 0.9
                   for c in ceiling.values()), ceiling
    assert "held_out_class" in zebra["ceiling"]["quality_by_type"]


def test_ceiling_images_are_kept_and_score_what_results_json_says(two_subjects):
    """The image grids' ceiling row shows the very images the ceiling's numbers were measured on."""
    out, results = two_subjects
    for part in results["subjects"]:
        kept = load_samples(out / part["ceiling"]["samples"])
        subj = get_subject(part["name"])
        judge = ToyJudge(subj, part["evaluation"]["prompts"], [])
        per_prompt = part["evaluation"]["images_per_prompt"]
        assert len(kept["subject"]) == len(part["evaluation"]["prompts"]) * per_prompt
        scores = judge.score([Samples(0, kept["subject"], kept["subject_prompt"], kept["class_images"],
                                      kept["class_prompt"])])
        assert round(scores["subject_fidelity"].value, 4) == part["ceiling"]["quality"]["subject_fidelity"]["value"]


def test_rows_pooled_over_subjects_weigh_each_subject_the_same(two_subjects):
    _, results = two_subjects
    pooled = {row["name"]: row for row in results["rows"]}
    for k, name in enumerate(("base", "textual-inversion")):
        per = [part["rows"][k] for part in results["subjects"]]
        for key in ("subject_fidelity", "subject_fidelity_hard", "prompt_fidelity", "prior_preservation"):
            mean = np.mean([row["quality"][key]["value"] for row in per])
            assert pooled[name]["quality"][key]["value"] == pytest.approx(mean, abs=2e-4), key
            assert pooled[name]["quality"][key]["n"] == sum(row["quality"][key]["n"] for row in per)
        # Unseen classes exist for the style alone: the pooled column is the style's.
        assert pooled[name]["quality_by_type"]["held_out_class"]["subject_fidelity"]["value"] == \
            pytest.approx(per[1]["quality_by_type"]["held_out_class"]["subject_fidelity"]["value"], abs=2e-4)
    ti = pooled["textual-inversion"]
    assert ti["cost"]["wall_time_s"]["values"] == [row["cost"]["wall_time_s"]["mean"]
                                                   for row in (p["rows"][1] for p in results["subjects"])]


def test_report_has_a_table_per_subject_and_a_pooled_one(two_subjects):
    out, results = two_subjects
    report = (out / "report.md").read_text()
    assert report.startswith("# sdtune compare: Textual Inversion on 2 subjects")
    sections = report.split("\n### ")
    titles = [section.splitlines()[0] for section in sections[1:]]
    assert titles == ["Pooled over the subjects", "quartered-circle (new look)", "zebra (style)",
                      "Per kind of subject"]
    circle_header = next(line for line in sections[2].splitlines() if line.startswith("| Method"))
    zebra_header = next(line for line in sections[3].splitlines() if line.startswith("| Method"))
    assert circle_header.split(" | ")[1:3] == ["Subject fidelity: one new factor ↑",
                                               "Subject fidelity: two new factors ↑"]
    assert "unseen classes" in zebra_header and "unseen classes" not in circle_header
    assert "| ceiling (renders through the VAE) |" in sections[3] and "| base (untouched) |" in sections[3]
    assert (out / "charts" / "grid_subject_zebra.png").stat().st_size > 1000
    assert (out / "charts" / "subject_fidelity_per_subject.png").stat().st_size > 1000


def test_report_and_results_json_read_each_kind_and_check_each_subject(two_subjects):
    out, results = two_subjects
    report = (out / "report.md").read_text()
    kinds, checks = results["readings"]["kinds"], results["readings"]["checks"]
    assert [(k["kind"], k["subjects"]) for k in kinds] == [("new look", ["quartered-circle"]), ("style", ["zebra"])]
    section = report.split("### Per kind of subject\n\n")[1].split("\n\n## ")[0]
    assert [line for line in section.splitlines() if line.startswith("- ")] == [f"- {k['text']}" for k in kinds]
    assert kinds[0]["text"].startswith("**For a new look, one no caption can ask for** (quartered-circle): ")
    assert "On classes its images never show" in kinds[1]["text"]
    # Two steps of training learn nothing: each subject's learnable check fails, with its numbers, in both files.
    assert [(c["subject"], c["passed"]) for c in checks] == [("quartered-circle", False), ("zebra", False)]
    table = report.split("## Benchmark checks\n\n")[1].split("\n\n## ")[0]
    assert "0 of 2 pass." in table
    for check, line in zip(checks, [line for line in table.splitlines() if line.startswith("| ")][2:]):
        assert line.startswith(f"| {check['subject']} (") and "| **fail**: " in line
        assert f"{check['half_way']:.3f}" in line and f"{check['estimate']['value']:.3f}" in line


def test_default_comparison_keeps_the_first_subjects_prompts_first(tmp_path):
    opts = CompareOptions(output=str(tmp_path))
    part = _part(opts, "builtin", get_subject("quartered-circle"), tmp_path)
    ev = part.plan.evaluation
    # The prompts the comparison always had keep their indices, so their images and numbers stay the same.
    assert fill(ev.prompts[:6], "sks", "circle") == list(first_subject.EVAL_PROMPTS)
    assert ev.class_prompts == first_subject.CLASS_EVAL_PROMPTS
    assert part.root == "subjects/quartered-circle" and (tmp_path / part.root / "subject" / "sks_00.txt").is_file()
    judge = ToyJudge(part.subject, fill(ev.prompts, "sks", "circle"), list(ev.class_prompts))
    assert [judge.types[j] for j in ev.curve_prompts] == ["two_factors"] * 6 + ["one_factor"] * 7
    # A --config's own prompts are no prompt type of the subject's: they are judged as "custom", all together.
    config = tmp_path / "own.yaml"
    config.write_text("eval: {prompts: ['a {token} circle on a red background']}\n")
    own = _part(CompareOptions(output=str(tmp_path), config=str(config)), "builtin", part.subject, tmp_path)
    assert own.plan.evaluation.curve_prompts == ()
    assert ToyJudge(part.subject, fill(own.plan.evaluation.prompts, "sks", "circle"), []).types == ["custom"]


def test_sampling_some_prompts_draws_them_as_sampling_all_does():
    from sdtune.model import load

    model = load("builtin")
    prompts = ["a red circle", "a sks circle on a blue background", "a small green triangle"]
    every, index = sample(model, prompts, 2, seed=3, steps=2, guidance=7.5)
    some, some_index = sample(model, prompts, 2, seed=3, steps=2, guidance=7.5, only=[2, 1])
    assert list(some_index) == [2, 2, 1, 1]
    assert np.array_equal(some[:2], every[index == 2]) and np.array_equal(some[2:], every[index == 1])


def test_judge_reads_the_headline_and_hard_columns_from_their_own_prompts():
    subj = get_subject("quartered-circle")
    prompts = [p for kind in ("one_factor", "two_factors") for p in subj.prompts[kind]]
    one, two = len(subj.prompts["one_factor"]), len(subj.prompts["two_factors"])
    drawn = _hwc(subj.prompt_renders(prompts[:one], 1, seed=1))
    plain = _hwc(render_batch(scenes_to_batch([Scene("circle", "yellow", "red")] * two)))
    classes = list(subj.prompts["class"])
    plain_classes = _hwc(render_batch(scenes_to_batch([Scene("circle", c, b) for c, b in (
        ("yellow", "blue"), ("purple", "white"), ("red", "green"), ("white", "black"), ("blue", "orange"),
        ("green", "red"))])))
    samples = [Samples(0, np.concatenate([drawn, plain]), np.arange(one + two), plain_classes, np.arange(6))]
    judge = ToyJudge(subj, prompts, classes)
    scores = judge.score(samples)
    assert scores["subject_fidelity"].value > 0.7 and scores["subject_fidelity_hard"].value < 0.05
    assert scores["subject_fidelity"].n == one and scores["prior_preservation"].value == 1.0
    by_type = judge.by_type(samples)
    assert by_type["one_factor"]["subject_fidelity"] == scores["subject_fidelity"]
    assert by_type["class"]["prior_preservation"] == scores["prior_preservation"]


def test_stratified_mean_weighs_groups_the_same_and_one_group_is_the_plain_bootstrap():
    assert stratified_mean([[0.2, 0.4, 0.9]]) == bootstrap_mean([0.2, 0.4, 0.9])
    est = stratified_mean([[1.0] * 30, [0.0] * 3])
    assert est.value == 0.5 and est.n == 33 and est.low == est.high == 0.5


def test_subject_requests_that_cannot_be_met_are_one_line_errors(capsys, tmp_path, subject_dir):
    for argv, needle in ((["--subjects", "nonesuch"], "nonesuch"),
                         (["--subjects", "zebra", "--images", str(subject_dir), "--class-word", "toy"], "--subjects")):
        assert main(["compare", *argv, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_several_subjects_report_shows_every_table_and_picture_in_chromium(two_subjects, tmp_path):
    import re

    from headless import chromium

    out, _ = two_subjects
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    tables = (out / "report.md").read_text().count("\n| --- |")
    with chromium(tmp_path / "profile") as browser:
        browser.get((out / "report.html").as_uri())
        images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        shown = browser.execute_script("return document.querySelectorAll('table').length")
    assert len(images) == len(figures) and all(done and width > 0 for done, width in images)
    assert shown == tables == 5  # the pooled results, per type pooled, one per subject, the benchmark checks
