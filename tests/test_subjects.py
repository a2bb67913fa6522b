"""The builtin benchmark subjects as data: four kinds, prompts of every type that change what their type says
they change, scorers that tell each subject from plain objects and from each other, the first subject's
names and numbers as before, and `sdtune subject --subject NAME`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.toyworld import metrics, subject
from sdtune.toyworld.captions import parse_caption
from sdtune.toyworld.catalogue import SUBJECTS, get_subject, select_subjects
from sdtune.toyworld.evaluate import read_images
from sdtune.toyworld.looks import Look
from sdtune.toyworld.subjects import PROMPT_TYPES, Context, Subject
from sdtune.toyworld.world import SHAPES, Scene, render_batch, sample_scenes, scenes_to_batch

CONTEXT = ("background", "position", "size")


def _new_context(asked: dict, subj: Subject) -> set[str]:
    """Which of background, position and size a prompt asks for that no instance image shows."""
    seen = {"background": {c.background for c in subj.instances}, "position": {c.position for c in subj.instances},
            "size": {subj.look.size or "large"}}
    return {k for k in CONTEXT if asked[k] is not None and asked[k] not in seen[k]}


def test_four_kinds_of_subject_each_with_its_images_and_every_prompt_type():
    assert {s.kind for s in SUBJECTS.values()} == {"new look", "nameable look", "style"}
    assert len(SUBJECTS) >= 4 and len({s.look.shape for s in SUBJECTS.values() if s.kind == "new look"}) >= 2
    for subj in SUBJECTS.values():
        assert len(subj.instances) >= 5 and len(subj.instance_captions()) == len(subj.instances)
        expected = set(PROMPT_TYPES) - ({"held_out_class"} if subj.kind != "style" else set())
        assert set(subj.prompts) == expected, subj.name
        backgrounds = [parse_caption(p)["background"] for kind, ps in subj.prompts.items() if kind != "class"
                       for p in ps]
        assert not set(backgrounds) & set(subj.look.colours), subj.name  # the object always stands out


def test_each_prompt_type_changes_what_it_says():
    for subj in SUBJECTS.values():
        shapes = {c.shape for c in subj.instances}
        for kind, prompts in subj.prompts.items():
            for prompt in prompts:
                asked = parse_caption(prompt)
                new = _new_context(asked, subj)
                assert (asked["identifier"] == subj.token) == (kind != "class"), prompt
                if kind in ("caption", "identifier"):
                    assert not new and asked["shape"] in shapes, prompt
                elif kind == "one_factor":
                    assert len(new) == 1 and asked["shape"] in shapes, prompt
                    assert not {k for k in subj.identity if asked[k] is not None} - {"shape"}, prompt
                elif kind == "two_factors":
                    assert new == {"background", "position"} and asked["shape"] in shapes, prompt
                elif kind == "held_out_class":
                    assert not new and asked["shape"] not in shapes, prompt
        assert subj.type_of(subj.prompts["one_factor"][0]) == "one_factor"
    assert len({parse_caption(p)["shape"] for p in get_subject("zebra").prompts["caption"]}) >= 3
    # The nameable look's size is its own: no one_factor prompt asks for another.
    assert all(parse_caption(p)["size"] is None for p in get_subject("green-triangle").prompts["one_factor"])


def test_the_first_subject_keeps_its_names_prompts_and_numbers():
    assert subject.INSTANCE_PROMPT == "a sks circle" and subject.CLASS_WORD == "circle"
    assert subject.EVAL_PROMPTS[:2] == ("a sks circle at the top right on a red background",
                                        "a sks circle at the bottom left on a red background")
    assert len(subject.EVAL_PROMPTS) == 6 and subject.CLASS_EVAL_PROMPTS[0] == "a yellow circle on a blue background"
    first = subject.instance_scenes()[0]  # jitter drawn in the same order as before
    assert (first.shape, first.colour, first.colour2, first.pattern, first.background, first.position) == \
        ("circle", "yellow", "purple", "quadrants", "blue", "center")
    assert (round(first.dx, 6), round(first.scale, 6)) == (0.005478, 0.926556)
    # Scores of the scorer as it was before the subjects became data (quarters split at the centroid, a heart
    # included), to the last digit printed then.
    scenes = [Scene("circle", "red", "white", pattern="quadrants", colour2="blue"),
              Scene("heart", "yellow", "green", "large", "top left", pattern="quadrants", colour2="purple"),
              Scene("square", "yellow", "black", "small", "center", pattern="quadrants", colour2="purple"),
              Scene("circle", "yellow", "blue", pattern="halves", colour2="purple")]
    images = torch.cat([subject.subject_renders(4, seed=9210), render_batch(scenes_to_batch(scenes))])
    scores = [round(r.score, 6) for r in subject.read_subject(images)]
    assert scores == [0.823011, 0.890274, 0.872958, 0.872041, 0.475346, 0.457827, 0.318822, 0.0]


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_scorer_tells_its_subject_from_plain_objects_and_other_subjects_on_renders(name):
    subj = get_subject(name)
    own = [r.score for r in subj.read(subj.renders(120, seed=9600))]
    plain = sample_scenes(120, seed=9601)
    classes = sorted({c.shape for c in subj.instances} | set(subj.held_out_shapes))
    plain.shape[:] = [SHAPES.index(classes[i % len(classes)]) for i in range(len(plain))]
    plain_scores = [r.score for r in subj.read(render_batch(plain))]
    assert np.mean(own) >= 0.7 and np.mean([s >= 0.5 for s in own]) >= 0.9, np.mean(own)
    # A plain object of the class is the subject only for a nameable look, and then only when it happens to
    # have the look's colour and size (an eighth of the colours, half the sizes).
    assert np.mean(plain_scores) < (0.15 if subj.kind == "nameable look" else 0.1), np.mean(plain_scores)
    for other in SUBJECTS.values():
        if other is not subj:
            assert np.mean([r.score for r in subj.read(other.renders(60, seed=9602))]) < 0.15, other.name


def test_scorer_sees_the_style_on_classes_its_images_never_show_and_a_wrong_shape_or_size_costs():
    zebra, triangle = get_subject("zebra"), get_subject("green-triangle")
    rng = np.random.default_rng(0)
    held_out = [zebra.look.scene(s, "purple", "center", rng=rng) for s in zebra.held_out_shapes for _ in range(10)]
    assert np.mean([r.score for r in zebra.read(render_batch(scenes_to_batch(held_out)))]) > 0.6
    right, large, square = (Scene("triangle", "green", "white", "small"), Scene("triangle", "green", "white", "large"),
                            Scene("square", "green", "white", "small"))
    scores = [r.score for r in triangle.read(render_batch(scenes_to_batch([right, large, square])))]
    assert scores[0] > 0.9 and 0.3 < scores[1] < 0.5 and 0.5 < scores[2] < 0.7


def test_metrics_per_prompt_type_on_what_each_prompt_asks_for():
    for subj in SUBJECTS.values():
        prompts = [p for kind, ps in subj.prompts.items() if kind != "class" for p in ps]
        images = subj.prompt_renders(prompts, 2, seed=9700)
        per_type = metrics.by_prompt_type(images, list(np.repeat(prompts, 2)), subj)
        assert set(per_type) == set(subj.prompts) - {"class"}
        for kind, found in per_type.items():
            assert found["prompt_fidelity"].value >= 0.95, (subj.name, kind)  # the evaluators err now and then
            assert found["subject_fidelity"].value > 0.5, (subj.name, kind, found)
            est = found["subject_fidelity"]
            assert est.low <= est.value <= est.high and est.n == 2 * len(subj.prompts[kind])
        plain = [Scene(a["shape"], a["colour"], a["background"], a["size"] or "large")
                 for a in map(parse_caption, subj.prompts["class"])]
        classes = metrics.by_prompt_type(render_batch(scenes_to_batch(plain)), list(subj.prompts["class"]), subj)
        assert classes == {"class": {"prior_preservation": metrics.Estimate(1.0, 1.0, 1.0, len(plain))}}
    # For a style the class is the prompt's to choose: a striped circle asked as a striped triangle is the
    # style (subject fidelity) but not the prompt.
    zebra = get_subject("zebra")
    prompt = zebra.prompts["held_out_class"][0]
    circle = render_batch(scenes_to_batch([zebra.look.scene("circle", "red", "center")]))
    assert metrics.prompt_scores(circle, [prompt], zebra) == [pytest.approx(2 / 3)]  # background, position; not shape
    triangle = render_batch(scenes_to_batch([zebra.look.scene("triangle", "red", "top right")]))
    assert metrics.prompt_scores(triangle, [subject.EVAL_PROMPTS[0]]) == [1.0]  # the first subject's shape: its own


def test_nameable_look_in_plain_words():
    triangle = get_subject("green-triangle")
    assert triangle.described("a sks triangle at the top right on a yellow background") == \
        "a small green triangle at the top right on a yellow background"
    with pytest.raises(ValueError):
        get_subject("zebra").described("a sks circle")


def test_a_new_subject_is_one_entry():
    dots = Subject(name="ringed-heart", kind="new look", description="a heart with a disc", token="zwx",
                   class_word="heart", look=Look("purple", "ring", "yellow", shape="heart"),
                   instances=tuple(Context("heart", b, "center") for b in ("blue", "green", "white", "red", "black")),
                   held_out_backgrounds=("orange",), held_out_positions=("top left",),
                   class_prompts=("a purple heart on a blue background",))
    assert dots.prompts["two_factors"] == ("a zwx heart at the top left on an orange background",)
    assert np.mean([r.is_subject for r in dots.read(dots.renders(40, seed=1))]) > 0.8


def test_subject_command_writes_any_builtin_subject(tmp_path, capsys):
    assert main(["subject", str(tmp_path / "z"), "--subject", "zebra"]) == 0
    out = capsys.readouterr().out
    assert "zebra" in out and "--class-word circle" in out
    paths = sorted((tmp_path / "z").glob("*.png"))
    assert len(paths) == 6
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    assert captions == get_subject("zebra").instance_captions()
    readings = read_images([Image.open(p).convert("RGB") for p in paths])
    assert [r.shape for r in readings] == [parse_caption(c)["shape"] for c in captions]
    assert all(r.is_subject for r in get_subject("zebra").read([Image.open(p) for p in paths]))
    assert main(["subject", str(tmp_path / "q"), "--subject", "nonesuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nonesuch" in err and "quartered-circle" in err


def test_subjects_are_chosen_by_name_or_all():
    assert [s.name for s in select_subjects("all")] == list(SUBJECTS)
    assert [s.name for s in select_subjects("zebra, green-triangle,zebra")] == ["zebra", "green-triangle"]
    with pytest.raises(Exception, match="no builtin subject 'x'"):
        select_subjects("x")
