"""Readings per kind of subject and the benchmark checks, derived from hand-made results: a tied pair, a clear
winner, a row not above the base model, a kind whose two subjects disagree, a failing check; and the sentences
change when the numbers do (derived, never written ahead)."""

from __future__ import annotations

import copy

from sdtune.compare.checks import LEARNABLE, benchmark_checks
from sdtune.compare.kinds import kind_readings

HALF = 0.03  # every interval's half-width


def est(value: float, half: float = HALF) -> dict:
    return {"value": value, "low": round(value - half, 4), "high": round(value + half, 4), "n": 24}


def row(name: str, subject: float, prompt: float = 0.9, prior: float = 0.9, unseen: float | None = None) -> dict:
    method = None if name == "base" else name.removesuffix("-no-prior")
    by_type = {"one_factor": {"subject_fidelity": est(subject)}}
    if unseen is not None:
        by_type["held_out_class"] = {"subject_fidelity": est(unseen)}
    quality = {"subject_fidelity": est(subject), "prompt_fidelity": est(prompt), "prior_preservation": est(prior)}
    return {"name": name, "method": method, "quality": quality, "quality_by_type": by_type}


def subject(name: str, kind: str, ceiling: float | None, rows: list[dict]) -> dict:
    part = {"name": name, "kind": kind, "token": "sks", "rows": rows}
    if ceiling is not None:
        part["ceiling"] = {"quality": {"subject_fidelity": est(ceiling)}}
    return part


def results() -> dict:
    """Four subjects of three kinds, with the base model first in each."""
    return {"subjects": [
        subject("quartered-circle", "new look", 0.95, [
            row("base", 0.05), row("dreambooth", 0.80), row("lora", 0.78), row("textual-inversion", 0.06),
            row("hypernetwork", 0.40)]),
        subject("dotted-square", "new look", 0.91, [
            row("base", 0.03), row("dreambooth", 0.70), row("lora", 0.50), row("textual-inversion", 0.05),
            row("hypernetwork", 0.04)]),
        subject("green-triangle", "nameable look", 0.95, [
            row("base", 0.10), row("dreambooth", 0.62, prior=0.40), row("lora", 0.30),
            row("textual-inversion", 0.60), row("hypernetwork", 0.12)]),
        subject("zebra", "style", 0.90, [
            row("base", 0.02, unseen=0.01), row("dreambooth", 0.20, unseen=0.02),
            row("lora", 0.40, prompt=0.5, unseen=0.30),
            row("textual-inversion", 0.10, unseen=0.10), row("hypernetwork", 0.03, unseen=0.01)]),
    ], "rows": []}


def by_kind(found: dict) -> dict[str, dict]:
    return {reading["kind"]: reading for reading in kind_readings(found)}


def test_a_kind_read_on_both_its_subjects_states_what_both_agree_on():
    new = by_kind(results())["new look"]
    assert new["subjects"] == ["quartered-circle", "dotted-square"]
    # lora ties dreambooth on the circle but is clearly below it on the square: only dreambooth is best on both.
    assert new["best"] == ["dreambooth"] and new["above_base"] == ["dreambooth", "lora"]
    assert new["above_base_on_some"] == {"hypernetwork": ["quartered-circle"]}
    assert new["not_above_base"] == ["textual-inversion"]
    text = new["text"]
    assert text.startswith("**For a new look, one no caption can ask for** (quartered-circle and dotted-square, "
                           "each read on its own): dreambooth (0.80 [0.77, 0.83] on quartered-circle, 0.70 [0.67, "
                           "0.73] on dotted-square) is best on subject fidelity with one new factor on both.")
    assert "dreambooth and lora are above it on both; hypernetwork only on quartered-circle." in text
    assert "textual-inversion (0.06 [0.03, 0.09] on quartered-circle, 0.05 [0.02, 0.08] on dotted-square) fails " \
           "here: not above the base model on any of them." in text
    assert "dreambooth keeps prompt fidelity and prior preservation at the base model's level." in text


def test_a_tied_pair_and_what_the_best_pay_on_the_class_word():
    nameable = by_kind(results())["nameable look"]
    assert nameable["best"] == ["dreambooth", "textual-inversion"]
    text = nameable["text"]
    assert text.startswith("**For a look the model can already draw from words** (green-triangle): dreambooth "
                           "(0.62 [0.59, 0.65]) and textual-inversion (0.60 [0.57, 0.63]) are best on subject "
                           "fidelity with one new factor (their 95% intervals overlap).")
    assert "dreambooth keeps the class word's meaning less well than the base model (0.40 [0.37, 0.43] against " \
           "0.90 [0.87, 0.93])." in text
    assert "Of the rows above the base model, textual-inversion and lora keep both at the base model's level." in text
    assert "hypernetwork (0.12 [0.09, 0.15]) fails here: not above the base model." in text


def test_a_clear_winner_on_a_style_and_the_classes_it_never_saw():
    style = by_kind(results())["style"]
    assert style["best"] == ["lora"] and style["unseen_classes"] == ["lora", "textual-inversion"]
    text = style["text"]
    assert text.startswith("**For a style** (zebra): lora (0.40 [0.37, 0.43]) is best on subject fidelity with "
                           "one new factor.")
    assert "lora follows the prompts' other words less well than the base model (0.50 [0.47, 0.53] against " \
           "0.90 [0.87, 0.93])." in text
    assert "On classes its images never show, lora and textual-inversion are above the base model; dreambooth " \
           "and hypernetwork do not." in text


def test_subjects_of_one_kind_that_disagree_on_the_best_row_are_named():
    found = results()
    found["subjects"][0]["rows"][2]["quality"]["subject_fidelity"] = est(0.60)  # lora clearly second on the circle
    found["subjects"][1]["rows"][1]["quality"]["subject_fidelity"] = est(0.30)  # and clearly first on the square
    new = by_kind(found)["new look"]
    assert new["best"] == []
    assert "(quartered-circle and dotted-square, each read on its own): no row is best on every subject (on " \
           "quartered-circle, dreambooth; on dotted-square, lora)." in new["text"]


def test_readings_follow_the_numbers_not_a_script():
    swapped = copy.deepcopy(results())
    triangle = swapped["subjects"][2]["rows"]
    triangle[3]["quality"]["subject_fidelity"] = est(0.11)  # textual-inversion now on the base model's level
    nameable = by_kind(swapped)["nameable look"]
    assert nameable["best"] == ["dreambooth"] and "textual-inversion" in nameable["not_above_base"]
    assert "hypernetwork (0.12 [0.09, 0.15]) and textual-inversion (0.11 [0.08, 0.14]) fail here" in nameable["text"]


def test_benchmark_checks_pass_and_fail_with_their_numbers():
    checks = benchmark_checks(results())
    assert [(c["subject"], c["check"].split(" (")[0], c["row"], c["passed"]) for c in checks] == [
        ("quartered-circle", LEARNABLE, "dreambooth", True), ("dotted-square", LEARNABLE, "dreambooth", True),
        ("green-triangle", LEARNABLE, "dreambooth", True),
        ("green-triangle", "textual-inversion above the base model", "textual-inversion", True),
        ("zebra", LEARNABLE, "lora", False)]
    zebra = checks[-1]
    # Half-way from the floor 0.02 to the ceiling 0.90 is 0.46: lora's 0.40 is above the base model but short.
    assert zebra["half_way"] == 0.46 and zebra["reasons"] == ["below the half-way mark"]
    assert zebra["text"] == ("zebra, best row half-way from floor to ceiling, above the base model: fail (below the "
                             "half-way mark): lora 0.40 [0.37, 0.43], floor (base model) 0.02 [-0.01, 0.05], ceiling "
                             "0.90 [0.87, 0.93], half-way mark 0.46.")
    assert checks[0]["half_way"] == 0.5 and checks[0]["reasons"] == []


def test_textual_inversion_not_above_the_base_model_fails_its_check():
    found = results()
    found["subjects"][2]["rows"][3]["quality"]["subject_fidelity"] = est(0.14)  # overlaps the base's 0.10 ± 0.03
    (check,) = [c for c in benchmark_checks(found) if c["check"].startswith("textual-inversion")]
    assert check["passed"] is False and check["reasons"] == ["interval not above the base model's"]
    assert "fail (interval not above the base model's): textual-inversion 0.14 [0.11, 0.17], floor (base model) " \
           "0.10 [0.07, 0.13]." in check["text"]


def test_a_best_row_past_the_mark_but_overlapping_the_base_fails_and_a_missing_ceiling_is_not_checked():
    found = results()
    circle = found["subjects"][0]
    circle["ceiling"]["quality"]["subject_fidelity"] = est(0.15)  # half-way mark 0.10
    for r in circle["rows"][1:]:
        r["quality"]["subject_fidelity"] = est(0.11, 0.05)  # past the mark, its interval reaches the base's
    found["subjects"][1]["ceiling"]["quality"]["subject_fidelity"] = None
    del found["subjects"][3]["ceiling"]  # one's own subject has none: no learnable check at all
    checks = {(c["subject"], c["check"]): c for c in benchmark_checks(found)}
    circle_check = checks[("quartered-circle", LEARNABLE)]
    assert circle_check["passed"] is False and circle_check["reasons"] == ["interval not above the base model's"]
    square = checks[("dotted-square", LEARNABLE)]
    assert square["passed"] is None and square["text"].startswith("dotted-square, " + LEARNABLE + ": not checked")
    assert not any(subject == "zebra" for subject, _ in checks)


def test_per_subject_chart_draws_each_row_on_each_subject_with_its_ceiling_and_half_way_mark(monkeypatch):
    from sdtune.compare import plots
    from sdtune.compare.report import _per_subject_bars

    figures, to_png = [], plots._png
    monkeypatch.setattr(plots, "_png", lambda plt, fig: (figures.append(fig), to_png(plt, fig))[1])
    found = results()
    found["rows"] = found["subjects"][0]["rows"]  # the pooled rows' names and order
    _per_subject_bars(found, found["subjects"])
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["quartered-circle", "dotted-square", "green-triangle",
                                                            "zebra"]
    heights = [round(bar.get_height(), 4) for bar in ax.patches]  # row by row, each over the four subjects
    assert heights[4:8] == [0.80, 0.70, 0.62, 0.20] and heights[12:16] == [0.06, 0.05, 0.60, 0.10]
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert lines == {"ceiling": 0.95, "half-way mark": 0.5}  # the first subject's, labelled once
    zebra = [line.get_ydata()[0] for line in ax.get_lines() if line.get_xdata()[0] == 3 - 0.45]
    assert zebra == [0.90, 0.46]


def test_a_kind_no_row_learns_says_so_instead_of_ranking_the_noise():
    found = results()
    for r in found["subjects"][3]["rows"][1:]:
        r["quality"]["subject_fidelity"] = est(0.03)  # every row on the base model's level on the style
    style = by_kind(found)["style"]
    assert style["best"] == ["dreambooth", "lora", "textual-inversion", "hypernetwork"]  # all tied, as data
    assert style["not_above_base"] == style["best"]
    assert style["text"] == ("**For a style** (zebra): no row lies above the base model (base 0.02 [-0.01, 0.05]; "
                             "dreambooth 0.03 [0.00, 0.06]; lora 0.03 [0.00, 0.06]; textual-inversion 0.03 [0.00, "
                             "0.06]; hypernetwork 0.03 [0.00, 0.06]): no method learns this kind with this recipe. "
                             "On classes its images never show, lora and textual-inversion are above the base model; "
                             "dreambooth and hypernetwork do not.")
