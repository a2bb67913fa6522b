"""Textual Inversion end to end: train with the CLI, generate, and match diffusers' own loader image for image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_subject_images
from sdtune.artifacts import load_artifact
from sdtune.cli import main

TOKEN = "<cat-toy>"
NAME = "cat-toy"  # file stem; an SDXL .pt (bare clip_l/clip_g, as A1111 reads it) answers to its stem only
CASES = {"sd1-1": ("sd1", 1), "sd1-3": ("sd1", 3), "sdxl-2": ("sdxl", 2)}


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dirs, tmp_path_factory):
    """case -> (model dir, folder with our default file, folder with our A1111 .pt), each trained once."""
    root = tmp_path_factory.mktemp("ti")
    images = make_subject_images(root / "subject")
    done = {}

    def get(case: str):
        if case not in done:
            family, vectors = CASES[case]
            default, a1111 = root / case / "default", root / case / "a1111"
            assert main(["train", "textual-inversion", "--model", str(tiny_pipeline_dirs[family]), "--images",
                         str(images), "--token", TOKEN, "--init-word", "toy", "--vectors", str(vectors),
                         "--steps", "4", "--lr", "0.05", "--output", str(default), "--name", NAME, "--quiet",
                         "--log-dir", "none"]) == 0
            assert main(["convert", str(default / f"{NAME}.safetensors"), str(a1111 / f"{NAME}.pt"),
                         "--to", "a1111"]) == 0
            done[case] = (tiny_pipeline_dirs[family], default, a1111)
        return done[case]

    return get


def _ours(model_dir, prompt, artifacts, out_png, negative=""):
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--artifacts", str(artifacts),
            "--steps", "4", "--seed", "3", "--guidance", "7.5", "--output", str(out_png)]
    assert main(argv + (["--negative-prompt", negative] if negative else [])) == 0
    return np.asarray(Image.open(out_png), dtype=np.float32) / 255


def _theirs(model_dir, embedding_file, prompt):
    """diffusers' pipeline with diffusers' own Textual Inversion loader (SDXL: clip_l and clip_g loaded into
    each encoder separately, as diffusers documents)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "text_encoder_2"):
        state, _ = load_artifact(embedding_file)
        pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(str(embedding_file))  # the token comes from the file (key / `name`)
    generator = torch.Generator().manual_seed(3)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, generator=generator).images[0]
    return np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("case", list(CASES))
def test_trained_embedding_matches_diffusers_loader(trained, tmp_path, case):
    model_dir, default, a1111 = trained(case)
    family, vectors = CASES[case]
    state, metadata = load_artifact(default / f"{NAME}.safetensors")
    widths = {"sd1": {TOKEN: 32}, "sdxl": {"clip_l": 32, "clip_g": 32}}[family]
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: (vectors, w) for k, w in widths.items()}
    assert metadata["method"] == "textual-inversion" and metadata["textual-inversion_token"] == TOKEN

    theirs = _theirs(model_dir, default / f"{NAME}.safetensors", f"a photo of {TOKEN}")
    ours = _ours(model_dir, f"a photo of {TOKEN}", default, tmp_path / "ours.png")
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
    pt_word = NAME if family == "sdxl" else TOKEN
    ours_pt = _ours(model_dir, f"a photo of {pt_word}", a1111, tmp_path / "ours_pt.png")
    assert np.abs(ours_pt - theirs).max() <= 1 / 255 + 1e-6
    theirs_pt = _theirs(model_dir, a1111 / f"{NAME}.pt", f"a photo of {TOKEN}")
    assert np.abs(ours_pt - theirs_pt).max() <= 1 / 255 + 1e-6


def test_training_changes_only_prompts_with_the_token(trained, tmp_path):
    model_dir, default, _ = trained("sd1-3")
    empty = tmp_path / "none"
    empty.mkdir()
    trained_image = _ours(model_dir, f"a photo of {TOKEN}", default, tmp_path / "trained.png")
    # The untrained vectors are three copies of "toy"'s row: that is the image training started from.
    start_image = _ours(model_dir, "a photo of toy toy toy", empty, tmp_path / "start.png")
    assert np.abs(trained_image - start_image).max() > 4 / 255, "training should visibly change the image"
    with_folder = _ours(model_dir, "a photo of a dog", default, tmp_path / "dog.png", negative="blurry")
    without = _ours(model_dir, "a photo of a dog", empty, tmp_path / "dog_base.png", negative="blurry")
    assert np.array_equal(with_folder, without)


def test_embedding_in_the_negative_prompt_is_activated(trained, tmp_path):
    model_dir, default, _ = trained("sd1-1")
    empty = tmp_path / "none"
    empty.mkdir()
    with_neg = _ours(model_dir, "a photo of a dog", default, tmp_path / "a.png", negative=TOKEN)
    plain_word = _ours(model_dir, "a photo of a dog", empty, tmp_path / "b.png", negative="cat toy")  # the words
    assert not np.array_equal(with_neg, plain_word)
