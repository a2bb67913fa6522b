"""Class images for prior preservation: topped up by the base model, cached with a manifest, reused by a
later run with the same base model and prompt, regenerated for another base model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdtune import class_images
from sdtune.config import DataConfig
from sdtune.model import SDModel, build_from_config, load


def _counting_pipeline(monkeypatch) -> list[str]:
    """Record every pipeline the class-image code builds (one per generating run)."""
    calls: list[str] = []
    real = SDModel.pipeline

    def pipeline(self, *args, **kwargs):
        calls.append(self.source)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SDModel, "pipeline", pipeline)
    return calls


def test_generated_class_images_are_cached_and_tied_to_the_base_model(tmp_path, monkeypatch):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "mine.png")  # the user's own image counts
    data = DataConfig(class_word="dog", class_images=str(folder), num_class_images=3, class_image_steps=2)
    calls = _counting_pipeline(monkeypatch)
    model = load("tiny:sd1")

    first = class_images.prepare(model, data, tmp_path / "unused", progress=False)
    assert len(first) == 3 and first[0].path.name == "mine.png" and len(calls) == 1
    manifest = json.loads((folder / class_images.MANIFEST).read_text())["images"]
    assert [(e["prompt"], e["seed"], e["base_hash"]) for e in manifest] == \
        [("a photo of a dog", 0, model.fingerprint()), ("a photo of a dog", 1, model.fingerprint())]
    assert not (tmp_path / "unused").exists()

    again = class_images.prepare(load("tiny:sd1"), data, tmp_path / "unused", progress=False)
    assert [r.path for r in again] == [r.path for r in first] and len(calls) == 1, "generated again"

    other = build_from_config("tiny:sd1", seed=1)
    assert other.fingerprint() != model.fingerprint()
    theirs = class_images.prepare(other, data, tmp_path / "unused", progress=False)
    assert len(calls) == 2 and len(theirs) == 3 and theirs[0].path.name == "mine.png"
    assert not {r.path for r in theirs[1:]} & {r.path for r in first[1:]}
    # The first model's images stay cached: switching back generates nothing.
    class_images.prepare(model, data, tmp_path / "unused", progress=False)
    assert len(calls) == 2 and len(list(folder.glob("*.png"))) == 5


def test_class_prompt_follows_the_model_and_the_user():
    model = load("tiny:sd1")
    assert class_images.class_prompt(model, DataConfig(class_word="dog")) == "a photo of a dog"
    model.extras["class_prompt_template"] = "a {class_word} on a grey background"
    assert class_images.class_prompt(model, DataConfig(class_word="dog")) == "a dog on a grey background"
    assert class_images.class_prompt(model, DataConfig(class_word="dog", class_prompt="dogs")) == "dogs"


def test_several_class_prompts_each_image_trained_with_its_own(tmp_path):
    """A model declaring several class prompts (the builtin model does) gets images of each, every image
    paired with the prompt it was generated from, in the manifest and in the training set."""
    from accelerate import Accelerator

    from sdtune.config import TrainConfig
    from sdtune.trainset import build_training_set

    model = load("tiny:sd1")
    model.extras["class_prompt_templates"] = ["a red {class_word}", "a blue {class_word}"]
    data = DataConfig(class_word="dog", num_class_images=3, class_image_steps=1, images=str(tmp_path / "subject"))
    records = class_images.prepare(model, data, tmp_path / "class", progress=False)
    assert [r.caption for r in records] == ["a red dog", "a blue dog", "a red dog"]
    manifest = json.loads((tmp_path / "class" / class_images.MANIFEST).read_text())["images"]
    assert [(e["seed"], e["prompt"]) for e in manifest] == [(0, "a red dog"), (1, "a blue dog"), (2, "a red dog")]
    # --class-prompt still means one prompt for every image; the cached ones of other prompts do not fit.
    mine = class_images.prepare(model, DataConfig(class_word="dog", class_prompt="a dog", num_class_images=1,
                                                  class_image_steps=1), tmp_path / "class", progress=False)
    assert [r.caption for r in mine] == ["a dog"] and mine[0].path not in {r.path for r in records}

    (tmp_path / "subject").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "subject" / "a.png")
    train = TrainConfig(steps=1, batch_size=1, prior_preservation=True)
    training_set = build_training_set(model, data, train, Accelerator(cpu=True), class_records=records)
    assert training_set.class_.dataset.prompts == ["a red dog", "a blue dog", "a red dog"]


def test_own_class_images_train_with_their_captions_or_the_plain_class_prompt(tmp_path, monkeypatch):
    """The user's class images keep their .txt caption; one without gets the prompt naming just the class,
    not one of the generated images' specific prompts (a red dog is not every dog)."""
    model = load("tiny:sd1")
    model.extras["class_prompt_templates"] = ["a red {class_word}", "a blue {class_word}"]
    model.extras["class_prompt_template"] = "a {class_word}"
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "captioned.png")
    (folder / "captioned.txt").write_text("a green dog on grass\n", encoding="utf-8")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(folder / "plain.png")
    monkeypatch.setattr(class_images, "_generate", lambda *a, **k: pytest.fail("nothing is missing"))
    records = class_images.prepare(model, DataConfig(class_word="dog", num_class_images=2), folder, progress=False)
    assert [(r.path.name, r.caption) for r in records] == [("captioned.png", "a green dog on grass"),
                                                          ("plain.png", "a dog")]


def test_a_new_prompt_generates_its_own_images_into_the_default_folder(tmp_path, monkeypatch):
    calls = _counting_pipeline(monkeypatch)
    model = load("tiny:sd1")
    default = tmp_path / "out" / "class_images"
    records = class_images.prepare(model, DataConfig(class_word="dog", num_class_images=1, class_image_steps=1),
                                   default, progress=False)
    assert records[0].path.parent == default
    records = class_images.prepare(model, DataConfig(class_word="cat", num_class_images=1, class_image_steps=1),
                                   default, progress=False)
    assert len(calls) == 2 and "cat" in records[0].path.name


def test_a_damaged_manifest_is_refused_by_name(tmp_path):
    from sdtune.errors import SdtuneError

    (tmp_path / class_images.MANIFEST).write_text("{not json")
    with pytest.raises(SdtuneError, match="manifest"):
        class_images.prepare(load("tiny:sd1"), DataConfig(class_word="dog", class_images=str(tmp_path)),
                             tmp_path, progress=False)
