"""LyCORIS-family files as users download them (LyCORIS's kohya layout; SD1, SD2, SDXL): `generate` with
<lora:NAME:W> gives the image of the pipeline that LyCORIS's own network changes, weight 0 gives the base image,
several files stack with their weights, the kohya conversion changes nothing, and a file for another family is
refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lycoris_oracle import detach, network, save
from sdtune.cli import main

PROMPT = "a sks dog"


def _pipeline(model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def _their_image(pipe) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


def _our_image(model_dir, tags: str, folder, out) -> np.ndarray:
    assert main(["generate", "--model", str(model_dir), "--prompt", f"{PROMPT} {tags}".strip(), "--artifacts",
                 str(folder), "--steps", "5", "--seed", "3", "--output", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32) / 255


# id -> (family, LyCORIS algo, options)
FILES = {
    "sd1-locon": ("sd1", "lora", {}),
    "sd1-locon-tucker": ("sd1", "lora", {"use_tucker": True}),
    "sd1-loha": ("sd1", "loha", {}),
    "sd1-lokr": ("sd1", "lokr", {"factor": 4}),
    "sd1-dora": ("sd1", "lora", {"dora_wd": True}),
    "sd2-loha-dora-per-input": ("sd2", "loha", {"dora_wd": True, "wd_on_output": False}),
    "sdxl-loha": ("sdxl", "loha", {}),
    "sdxl-lokr-tucker": ("sdxl", "lokr", {"factor": 4, "use_tucker": True, "decompose_both": True}),
    "sdxl-dora": ("sdxl", "lora", {"dora_wd": True}),
}


@pytest.mark.parametrize("case", FILES)
def test_generate_applies_the_file_as_lycoris_does(tiny_pipeline_dirs, tmp_path, case):
    family, algo, options = FILES[case]
    model_dir, folder = tiny_pipeline_dirs[family], tmp_path / "artifacts"
    pipe = _pipeline(model_dir)
    base = _their_image(pipe)
    save(network(pipe.unet, _encoders(pipe), tmp_path, algo, **options), folder / "lyco.safetensors")
    theirs = _their_image(pipe)
    ours = _our_image(model_dir, "<lora:lyco:1>", folder, tmp_path / "ours.png")
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
    assert np.abs(theirs - base).max() > 4 / 255, "the file should visibly change the image"
    if family == "sdxl":  # LyCORIS names SDXL's UNet as diffusers does; kohya's SDXL layout uses LDM names
        converted = tmp_path / "kohya" / "lyco.safetensors"
        assert main(["convert", str(folder / "lyco.safetensors"), str(converted), "--to", "kohya", "--model",
                     str(model_dir)]) == 0
        again = _our_image(model_dir, "<lora:lyco:1>", converted.parent, tmp_path / "again.png")
        assert np.array_equal(again, ours)


def test_weight_zero_gives_the_base_image_and_files_stack_with_their_weights(tiny_pipeline_dirs, tmp_path):
    model_dir, folder = tiny_pipeline_dirs["sd1"], tmp_path / "artifacts"
    pipe = _pipeline(model_dir)
    dora = network(pipe.unet, _encoders(pipe), tmp_path, "lora", seed=3, dora_wd=True)
    save(dora, folder / "dora.safetensors")
    detach(dora)
    hada = network(pipe.unet, _encoders(pipe), tmp_path, "loha", seed=1)
    kron = network(pipe.unet, _encoders(pipe), tmp_path, "lokr", seed=2, factor=4)
    for module in kron.loras:
        module.multiplier = 0.5  # without DoRA, LyCORIS's multiplier means what a prompt weight means
    theirs = _their_image(pipe)
    save(hada, folder / "hada.safetensors")
    save(kron, folder / "kron.safetensors")

    base = _our_image(model_dir, "", folder, tmp_path / "base.png")
    zero = _our_image(model_dir, "<lora:hada:0> <lora:kron:0> <lora:dora:0>", folder, tmp_path / "zero.png")
    assert np.array_equal(zero, base)
    both = _our_image(model_dir, "<lora:hada:1> <lora:kron:0.5>", folder, tmp_path / "both.png")
    assert np.abs(both - theirs).max() <= 1 / 255 + 1e-6
    one = _our_image(model_dir, "<lora:hada:1>", folder, tmp_path / "one.png")
    assert np.abs(both - one).max() > 4 / 255, "the second file should change the image too"


def test_a_file_for_another_family_is_refused_in_one_line(tiny_pipeline_dirs, tmp_path, capsys):
    pipe = _pipeline(tiny_pipeline_dirs["sdxl"])
    save(network(pipe.unet, _encoders(pipe), tmp_path, "loha"), tmp_path / "a" / "xl.safetensors")
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_pipeline_dirs["sd1"]), "--prompt", "a dog <lora:xl:1>",
                 "--artifacts", str(tmp_path / "a"), "--steps", "2", "--output", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "xl.safetensors" in err and "sdxl" in err and "sd1" in err, err
