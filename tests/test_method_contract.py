"""Every registered method through the same checks, the way a user meets it: train a few steps on tiny:sd1 with
its default settings, save every layout it writes, `inspect` names each file, each file loads and gives the
trained model's image, weight 0 gives the base image, resuming is bit-exact, and a file for another model family
is refused in one line. A new method is picked up by registering it; what the checks do with it follows from
what it declares (a prompt tag, found by name, or a whole model used as --model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_subject_images
from sdtune import methods
from sdtune.artifacts import load_artifact
from sdtune.config import DataConfig, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.generate import GenerateOptions, generate, load_for_model
from sdtune.inspection import artifact_sniff, describe_artifact
from sdtune.model import load
from sdtune.train import train

NAME = "art"
COMMON = dict(lr=1e-2, batch_size=2, seed=5, log_dir="none")
MODEL_ONLY = "its artifact is a whole model, used as --model: a prompt gives it no weight"
# Settings that make a method train another kind of file, checked as cases of their own: id -> (method,
# settings, layouts its files cannot be written in). LoKr at factor 4 and rank 4 splits some layers' factors and
# leaves others full (scale 1 whatever alpha says), and alpha 2 makes the difference show.
VARIANTS = {
    "lora-loha": ("lora", {"algo": "loha", "alpha": 2.0, "targets": "attn,conv"}, {"diffusers"}),
    "lora-lokr": ("lora", {"algo": "lokr", "alpha": 2.0, "lokr_factor": 4, "targets": "attn,conv"}, {"diffusers"}),
}


def _applied_by(cls) -> str:
    return "tag" if cls.prompt_tag else "name" if cls.found_by_name else "model"


def _methods(skip_models: str = "") -> list:
    """Every registered method (default settings) and variant as a parameter; those whose artifact is a whole
    model skip, saying why."""
    cases = {name: (name, {}, set()) for name in methods.registry()} | VARIANTS
    return [pytest.param(case, id=key, marks=[pytest.mark.skip(reason=f"{key}: {skip_models}")]
                         if skip_models and _applied_by(methods.get(case[0])) == "model" else [])
            for key, case in cases.items()]


@dataclass
class Trained:
    """One method trained on tiny:sd1, its files per written layout and the trained model."""

    cls: type
    token: str
    model: object
    files: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return f"a {self.token} dog"


def _image(model, prompt: str, folder: Path | None = None) -> np.ndarray:
    options = GenerateOptions(steps=2, seed=1, artifact_dirs=[folder] if folder else [])
    return np.asarray(generate(model, prompt, options)[0])


def _train(cls, model, out: Path, settings: dict | None = None, **options):
    """`cls` with `settings` (default: its defaults), trained on a toy subject (its own spelling of the word sks)."""
    method = cls(cls.config_class(**settings) if settings else None)
    data = DataConfig(images=str(make_subject_images(out.parent / "subject")), class_word="dog",
                      token=cls.token_template.format(token="sks"))
    train(model, method, TrainConfig(**{**COMMON, "steps": 2, **options}), data, out, NAME, progress=False)
    return method


def _apply_file(model, cls, path: Path, weight: float) -> None:
    """What generate does with a file a prompt names: read it (refused when its run card names another model
    family), decode it, apply it."""
    obj, metadata = load_for_model(model, path)
    method = cls()
    method.apply(model, method.decode_file(model, obj, metadata, path), weight, name=NAME)


def _artifacts(folder: Path) -> list[Path]:
    """The files a run wrote under its name (not its checkpoints, logs or config)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.stem == NAME)


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> Trained:
    """The method with its settings (indirect parameter) trained once per module, then saved in every layout it
    writes; a layout its settings cannot be written in is refused in one line, before and at saving."""
    name, settings, refused = request.param
    cls = methods.get(name)
    root, model = tmp_path_factory.mktemp(cls.name), load("tiny:sd1")
    method = _train(cls, model, root / "run", settings)
    card = load_artifact(_artifacts(root / "run")[0])[1]
    result = Trained(cls, cls.token_template.format(token="sks"), model)
    for layout in (lay for lay in cls.layouts if lay.written):
        if layout.name in refused:
            for attempt in (lambda: method.output_files(NAME, layout.name),
                            lambda: method.save(model, root / layout.name, NAME, card, layout.name)):
                with pytest.raises(SdtuneError) as refusal:
                    attempt()
                assert len(str(refusal.value).splitlines()) == 1 and layout.name in str(refusal.value)
            assert not (root / layout.name).exists()
            continue
        result.files[layout.name] = method.save(model, root / layout.name, NAME, card, layout.name)
    return result


@pytest.mark.parametrize("trained", _methods(), indirect=True)
def test_every_layout_is_written_and_inspect_names_its_method(trained):
    assert trained.files, f"{trained.cls.name} declares no layout it writes"
    for name, paths in trained.files.items():
        layout = methods.layout_of(trained.cls, name)
        assert any(p.name == NAME + layout.suffix or p.name == NAME and layout.suffix == "/" for p in paths), paths
        for path in (p for p in paths if p.is_file()):  # a folder is a model: the next test loads it
            sniffed = artifact_sniff(path)
            assert sniffed.method == trained.cls.name, (name, sniffed)
            if layout.keys:  # layouts with the same tensor names (one tensor named by a token) sniff alike
                assert methods.layout_of(trained.cls, sniffed.layout).keys == layout.keys, (name, sniffed)
            assert f"format:     {sniffed.title}\n" in describe_artifact(path)


@pytest.mark.parametrize("trained", _methods(), indirect=True)
def test_every_layout_loads_and_gives_the_trained_image(trained, tiny_pipeline_dirs):
    expected = _image(trained.model, trained.prompt)
    for name, paths in trained.files.items():
        for path in paths:
            if _applied_by(trained.cls) == "model":  # a single file offline takes its architecture from a folder
                got = _image(load(str(path), config=str(tiny_pipeline_dirs["sd1"]) if path.is_file() else None),
                             trained.prompt)
            elif _applied_by(trained.cls) == "tag":
                got = _image(load("tiny:sd1"), f"{trained.prompt} <{trained.cls.prompt_tag}:{NAME}:1>", path.parent)
            else:
                got = _image(load("tiny:sd1"), trained.prompt, path.parent)
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, (name, path.name)
    if not trained.cls.found_by_name:  # (its word is new: the base model refuses the prompt)
        assert not np.array_equal(expected, _image(load("tiny:sd1"), trained.prompt)), "training changed nothing"


@pytest.mark.parametrize("trained", _methods(MODEL_ONLY), indirect=True)
def test_weight_zero_is_the_base_image(trained):
    for name, paths in trained.files.items():
        if trained.cls.prompt_tag:
            folder = paths[0].parent
            zero = _image(load("tiny:sd1"), f"{trained.prompt} <{trained.cls.prompt_tag}:{NAME}:0>", folder)
            base = _image(load("tiny:sd1"), trained.prompt)
        else:  # found by name: a prompt has no weight for it, so it is applied at 0 as generate applies it
            model = load("tiny:sd1")
            _apply_file(model, trained.cls, paths[0], 0.0)
            zero, base = _image(model, "a dog"), _image(load("tiny:sd1"), "a dog")
        assert np.array_equal(zero, base), name


@pytest.mark.parametrize("case", _methods())
def test_resume_is_bit_exact(case, tmp_path):
    name, settings, _ = case
    cls = methods.get(name)
    _train(cls, load("tiny:sd1"), tmp_path / "full", settings, steps=3, checkpoint_every=1)
    _train(cls, load("tiny:sd1"), tmp_path / "resumed", settings, steps=3,
           resume=str(tmp_path / "full" / "checkpoints" / "step-000001"))
    assert _artifacts(tmp_path / "full"), "the run wrote no file under its name"
    for path in _artifacts(tmp_path / "full"):
        full, resumed = load_artifact(path)[0], load_artifact(tmp_path / "resumed" / path.name)[0]
        assert full.keys() == resumed.keys() and full
        for key, value in full.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed[key]), (path.name, key)


@pytest.mark.parametrize("trained", _methods("a whole model fits no base model: there is nothing to refuse"),
                         indirect=True)
def test_a_file_for_another_family_is_refused_in_one_line(trained):
    for name, paths in trained.files.items():
        for path in paths:
            with pytest.raises(SdtuneError) as refused:
                _apply_file(load("tiny:sdxl"), trained.cls, path, 1.0)
            assert len(str(refused.value).splitlines()) == 1, (name, refused.value)
