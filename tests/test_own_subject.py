"""A subject of one's own on the builtin model gets quality numbers offline: toy-world prompts from its images and
class word, subject fidelity by an object similarity to its images (no download), prompt fidelity by the toy
world's evaluators; and the similarity ranks rows as the builtin subjects' exact scorers do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdtune.cli import main
from sdtune.compare.sampling import save_samples
from sdtune.compare.similarity_check import pairs, report, spearman
from sdtune.toyworld.captions import parse_caption
from sdtune.toyworld.catalogue import SUBJECTS
from sdtune.toyworld.looks import Look
from sdtune.toyworld.own_subject import object_colours, own_subject
from sdtune.toyworld.similarity import similarity
from sdtune.toyworld.world import COLOURS, Scene, render, render_batch, scenes_to_batch, to_pil

# A look none of the builtin subjects uses: a star, orange on its right half and blue on its left.
STAR = Look("orange", "halves", "blue", shape="star")
STAR_CONTEXTS = (("green", "center"), ("white", "top left"), ("green", "bottom right"), ("purple", "center"),
                 ("white", "top right"))
TINY = """
eval: {sample_steps: 2, images_per_prompt: 1, curve_points: 1}
rows:
  textual-inversion: {train: {steps: 2, batch_size: 1}}
  hypernetwork: {train: {steps: 2, batch_size: 1}}
"""


def _star_images(folder=None) -> list:
    rng = np.random.default_rng(5)
    images = [to_pil(render(STAR.scene("star", bg, pos, rng=rng))) for bg, pos in STAR_CONTEXTS]
    if folder is not None:
        folder.mkdir()
        for i, image in enumerate(images):
            image.save(folder / f"star_{i}.png")
    return images


def _hwc(scenes: list[Scene]) -> np.ndarray:
    return render_batch(scenes_to_batch(scenes)).permute(0, 2, 3, 1).numpy()


def test_own_images_on_the_builtin_model_get_numeric_subject_and_prompt_fidelity(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "out"
    argv = ["compare", "--model", "builtin", "--images", str(tmp_path / "stars"), "--class-word", "star",
            "--methods", "textual-inversion,hypernetwork", "--config", str(config), "--output", str(out), "--quiet"]
    _star_images(tmp_path / "stars")
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["base", "textual-inversion", "hypernetwork"]
    for row in results["rows"]:
        for key in ("subject_fidelity", "subject_fidelity_hard", "prompt_fidelity", "prior_preservation"):
            est = row["quality"][key]
            assert est is not None and 0 <= est["low"] <= est["value"] <= est["high"] <= 1, (row["name"], key)
    assert not results["missing_metrics"]

    # Toy-world prompts from the class word: backgrounds and positions the images never show, never the star's
    # own colours, and the class prompts plain stars.
    prompts = [parse_caption(p) for p in results["evaluation"]["prompts"]]
    assert {p["shape"] for p in prompts} == {"star"} and all(p["identifier"] == "sks" for p in prompts)
    new = {p["background"] for p in prompts} - {bg for bg, _ in STAR_CONTEXTS} - {None}
    assert new and not new & {"orange", "blue"}
    assert {p["position"] for p in prompts} - {pos for _, pos in STAR_CONTEXTS} - {None}
    assert all(parse_caption(p)["shape"] == "star" and "sks" not in p for p in results["evaluation"]["class_prompts"])

    # The report names the similarity it used and what the images were.
    report_md = (out / "report.md").read_text()
    assert "**Subject fidelity**: object similarity to your images (offline" in report_md
    assert f"the images in `{tmp_path / 'stars'}`" in report_md


def test_a_class_word_the_toy_world_cannot_draw_is_a_one_line_error(tmp_path, capsys):
    _star_images(tmp_path / "stars")
    code = main(["compare", "--images", str(tmp_path / "stars"), "--class-word", "dog", "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--class-word dog" in err and "star" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("look", [*(s.look for s in SUBJECTS.values()), STAR], ids=[*SUBJECTS, "star"])
def test_the_subjects_own_renders_score_above_plain_class_objects(look):
    subject = next((s for s in SUBJECTS.values() if s.look == look), None)
    shapes = [c.shape for c in subject.instances] if subject else ["star"]
    references = subject.instance_images() if subject else _star_images()
    rng = np.random.default_rng(11)
    backgrounds = [c for c in COLOURS if c not in look.colours]
    contexts = [(shapes[k % len(shapes)], backgrounds[k % len(backgrounds)], pos)
                for k, pos in enumerate(["center", "top right", "bottom left", "top left", "bottom right"] * 2)]
    own = similarity(_hwc([look.scene(shape, bg, pos, rng=rng) for shape, bg, pos in contexts]), references)
    # Plain class objects, one colour each: every other colour, and a patterned look's own two as well.
    colours = [c for c in COLOURS if look.colour2 or c != look.colour]
    plain = similarity(_hwc([Scene(shape, colour, bg, look.size or "large", pos) for (shape, bg, pos), colour
                             in zip(contexts * 2, colours * 3) if colour != bg]), references)
    assert own.min() > 0.5 > 0.2 > plain.max(), (own.round(2), plain.round(2))


def test_object_colours_are_the_look_colours():
    assert set(object_colours(render_batch(scenes_to_batch([STAR.scene("star", "green", "center")])) / 255)) \
        == {"orange", "blue"}


def test_own_subject_prompts_keep_to_the_contexts_its_images_never_show():
    own = own_subject(_star_images(), "star")
    # One thing the images never show per prompt: a background that is not the star's own colours either, or
    # the one position they miss.
    asked = [parse_caption(p) for p in own.prompts["one_factor"]]
    new_backgrounds = [a["background"] not in {bg for bg, _ in STAR_CONTEXTS} for a in asked]
    new_positions = [a["position"] not in {pos for _, pos in STAR_CONTEXTS} for a in asked]
    assert all(b != p for b, p in zip(new_backgrounds, new_positions)) and any(new_positions)
    assert {a["background"] for a, new in zip(asked, new_backgrounds) if new} == {"red", "yellow", "black"}
    assert {a["position"] for a, new in zip(asked, new_positions) if new} == {"bottom left"}
    assert "small" not in " ".join(own.prompts["one_factor"])  # the size may be the subject's own
    assert [r.is_subject for r in own.read(_star_images())] == [True] * 5


def _fake_comparison(root, subject, rows: dict[str, float]) -> None:
    """A comparison folder of one builtin subject whose rows drew the subject in a share of their one-new-factor
    images (the others plain objects), as `sdtune compare` lays it out."""
    folder = root / "subjects" / subject.name
    subject.write_instance_images(folder / "subject")
    prompts = list(subject.prompts["one_factor"])
    rng = np.random.default_rng(3)
    for row, share in rows.items():
        drawn = subject.prompt_renders(prompts, 4, seed=1).permute(0, 2, 3, 1).numpy()
        asked = [parse_caption(p) for p in prompts for _ in range(4)]
        plain = _hwc([Scene(a["shape"], next(c for c in COLOURS if c not in (a["background"], *subject.look.colours)),
                            a["background"], a["size"] or "large", a["position"]) for a in asked])
        images = np.where((rng.random(len(asked)) < share)[:, None, None, None], drawn, plain)
        run = folder / "runs" / row / "seed-0"
        run.mkdir(parents=True)
        template = [p.replace(f" {subject.token} ", " {token} ") for p in prompts]
        (run / "job.json").write_text(json.dumps({"class_word": subject.class_word, "eval": {"prompts": template}}))
        index = np.repeat(np.arange(len(prompts)), 4)
        save_samples(run / "step-000010.npz", (images.astype(np.uint8), index),
                     (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)))


def test_the_check_ranks_a_comparison_folders_rows_by_both_scorers(tmp_path):
    _fake_comparison(tmp_path, SUBJECTS["dotted-square"], {"base": 0.0, "half": 0.5, "all": 1.0})
    _fake_comparison(tmp_path, SUBJECTS["zebra"], {"base": 0.0, "quarter": 0.25, "most": 0.8})
    found = {(p.subject, p.row): p for p in pairs(tmp_path)}
    assert len(found) == 6 and all(p.n == 28 for p in found.values())
    for subject, rows in (("dotted-square", ("base", "half", "all")), ("zebra", ("base", "quarter", "most"))):
        exact = [found[(subject, r)].exact for r in rows]
        similar = [found[(subject, r)].similar for r in rows]
        assert exact == sorted(exact) and similar == sorted(similar), (subject, exact, similar)
    assert spearman([p.exact for p in found.values()], [p.similar for p in found.values()]) >= 0.8
    assert report(tmp_path).splitlines()[-1].startswith("Spearman over 6 (subject, row) pairs, one_factor prompts: ")
    assert spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
