"""Evaluators, the builtin subject and the metrics, on fresh ground-truth renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.toyworld import metrics, subject
from sdtune.toyworld.captions import caption, parse_caption
from sdtune.toyworld.evaluate import ATTRIBUTES, attribute_accuracy, judge_images, read_images
from sdtune.toyworld.world import Scene, render_batch, sample_scenes, scenes_to_batch


def _truth(batch) -> list[dict]:
    return [{k: getattr(batch.scene(i), k) for k in ATTRIBUTES} for i in range(len(batch))]


@pytest.mark.parametrize(("size", "n"), [(32, 600), (64, 150)])
def test_evaluator_reads_fresh_renders(size, n):
    batch = sample_scenes(n, seed=9000 + size)  # seeds no other test or the recipe uses
    readings = [r.as_dict() for r in read_images(render_batch(batch, size))]
    acc = attribute_accuracy(readings, _truth(batch))
    assert set(acc) == set(ATTRIBUTES)
    assert all(v >= 0.98 for v in acc.values()), acc


def test_evaluator_accepts_pil_and_arrays_and_sees_empty_images():
    img = render_batch(sample_scenes(1, seed=5))[0]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    assert read_images(pil)[0] == read_images(img.permute(1, 2, 0).numpy())[0] == read_images(img)[0]
    blank = np.full((32, 32, 3), 0.5, dtype=np.float32)
    reading = read_images(blank[None])[0]
    assert reading.shape is None and reading.position is None


def test_independent_judge_agrees_with_the_evaluator_on_renders():
    batch = sample_scenes(300, seed=9100)
    images = render_batch(batch)
    judged, truth = judge_images(images), _truth(batch)
    acc = attribute_accuracy(judged, truth)
    assert all(v >= 0.95 for v in acc.values()), acc
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    agree = attribute_accuracy(judge_images(blurred / 255), [r.as_dict() for r in read_images(blurred / 255)])
    # They still agree on blurrier, generated-like images (the crude judge loses small blurred stars first).
    floors = {"background": 0.95, "colour": 0.95, "position": 0.95, "size": 0.9, "shape": 0.85}
    assert all(agree[k] >= v for k, v in floors.items()), agree
    truth_blurred = attribute_accuracy([r.as_dict() for r in read_images(blurred / 255)], truth)
    assert all(v >= 0.97 for v in truth_blurred.values()), truth_blurred  # the evaluator itself copes with blur


def test_subject_evaluator_tells_the_subject_from_plain_circles():
    subj = subject.read_subject(subject.subject_renders(300, seed=9200))
    plain_batch = sample_scenes(300, seed=9201)
    plain_batch.shape[:] = 0  # every plain scene a circle, in every colour including the subject's two
    plain = subject.read_subject(render_batch(plain_batch))
    others = subject.read_subject(render_batch(sample_scenes(200, seed=9202)))
    assert np.mean([r.is_subject for r in subj]) >= 0.98
    assert np.mean([not r.is_subject for r in plain]) >= 0.98
    assert np.mean([not r.is_subject for r in others]) >= 0.98
    wrong_colours = Scene("circle", "red", "white", pattern="quadrants", colour2="blue")
    assert subject.read_subject(render_batch(scenes_to_batch([wrong_colours])))[0].score < 0.75 * subj[0].score


def test_instance_images_and_held_out_prompts(tmp_path):
    paths = subject.write_instance_images(tmp_path / "inst", captions=True)
    assert len(paths) == 5 and all(p.suffix == ".png" for p in paths)
    images = [Image.open(p).convert("RGB") for p in paths]
    assert all(im.size == (32, 32) for im in images)
    assert all(r.is_subject for r in subject.read_subject(images))
    seen = {(r.background, r.position) for r in read_images(images)}
    assert seen == set(subject.INSTANCE_LAYOUT)
    assert paths[0].with_suffix(".txt").read_text().startswith(subject.INSTANCE_PROMPT)
    for prompt in subject.EVAL_PROMPTS:
        asked = parse_caption(prompt)
        assert asked["identifier"] == subject.TOKEN and asked["shape"] == subject.CLASS_WORD
        assert asked["background"] not in {b for b, _ in seen} and asked["position"] not in {p for _, p in seen}
    assert subject.INSTANCE_PROMPT == "a sks circle" and subject.CLASS_PROMPT == "a circle"


def test_metrics_separate_good_from_bad_images():
    prompt = subject.EVAL_PROMPTS[0]
    asked = parse_caption(prompt)
    good = subject.subject_renders(16, seed=9300, backgrounds=[asked["background"]], positions=[asked["position"]])
    plain = render_batch(scenes_to_batch([Scene("circle", "yellow", asked["background"], "large", asked["position"])
                                          for _ in range(16)]))
    fid_good, fid_plain = metrics.subject_fidelity(good), metrics.subject_fidelity(plain)
    assert fid_good.low > 0.7 and fid_plain.high < 0.1
    assert fid_good.low <= fid_good.value <= fid_good.high and fid_good.n == 16
    assert metrics.prompt_fidelity(good, [prompt] * 16).value == 1.0
    elsewhere = subject.subject_renders(16, seed=9301, backgrounds=["white"], positions=["center"])
    assert metrics.prompt_fidelity(elsewhere, [prompt] * 16).value == 0.0

    class_prompt = caption("circle", "yellow", background=asked["background"])
    assert metrics.prior_preservation(plain, [class_prompt] * 16).value == 1.0
    assert metrics.prior_preservation(good, [class_prompt] * 16).value == 0.0  # the subject leaked into the class

    same = torch.stack([plain[0]] * 8)
    assert metrics.diversity(same, [class_prompt] * 8).value == 0.0
    varied = render_batch(sample_scenes(8, seed=9302))
    div = metrics.diversity(varied, [class_prompt] * 8)
    assert div.value > 0.1 and div.low <= div.value <= div.high


def test_bootstrap_interval_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = metrics.bootstrap_mean(rng.random(10))
    large = metrics.bootstrap_mean(rng.random(1000))
    assert large.high - large.low < 0.5 * (small.high - small.low)
    assert metrics.bootstrap_mean([1.0, 1.0]) == metrics.Estimate(1.0, 1.0, 1.0, 2)
