"""`train lora --dora`: peft's DoRA (one magnitude per output feature), written in the diffusers/PEFT layout
(diffusers' `load_lora_weights` gives sdtune's image) and in the kohya/LyCORIS layout (`dora_scale` [out, 1, ...],
the shape by which ComfyUI and LyCORIS tell the output axis), converted between them bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.artifacts import load_artifact
from sdtune.cli import main


def _train(model_dir, images, out, fmt, *extra):
    assert main(["train", "lora", "--model", str(model_dir), "--images", str(images), "--token", "sks",
                 "--class-word", "dog", "--steps", "4", "--lr", "3e-2", "--output", str(out), "--format", fmt,
                 "--rank", "4", "--alpha", "2", "--dora", "--quiet", "--log-dir", "none", *extra]) == 0
    return out / "sks.safetensors"


def _ours(model_dir, folder, out, tag="<lora:sks:1>"):
    assert main(["generate", "--model", str(model_dir), "--prompt", f"a sks dog {tag}", "--artifacts", str(folder),
                 "--steps", "5", "--seed", "3", "--output", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32) / 255


def _diffusers(model_dir, lora_file=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    image = pipe("a sks dog", num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("family, targets", [("sd1", "attn,conv"), ("sdxl", "attn")])
def test_dora_file_loads_in_diffusers_and_gives_sdtune_image(tiny_pipeline_dirs, subject_dir, tmp_path, family,
                                                             targets):
    model_dir = tiny_pipeline_dirs[family]
    lora = _train(model_dir, subject_dir, tmp_path / "out", "diffusers", "--lora-targets", targets,
                  "--train-text-encoder")
    tensors, metadata = load_artifact(lora)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.use_dora"] and config["text_encoder.use_dora"]
    assert any(k.startswith("unet.") and k.endswith(".lora_magnitude_vector") for k in tensors)
    ours = _ours(model_dir, lora.parent, tmp_path / "ours.png")
    assert np.abs(ours - _diffusers(model_dir, lora)).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - _diffusers(model_dir)).max() > 4 / 255, "DoRA should visibly change the image"


def test_kohya_dora_file_says_its_axis_by_shape_and_converts_bit_exact(tiny_pipeline_dirs, subject_dir, tmp_path):
    model_dir = tiny_pipeline_dirs["sd1"]
    lora = _train(model_dir, subject_dir, tmp_path / "kohya", "kohya", "--lora-targets", "attn,conv")
    tensors, metadata = load_artifact(lora)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len([k for k in tensors if k.endswith(".lora_up.weight")])
    for key, scale in scales.items():
        up = tensors[key.replace(".dora_scale", ".lora_up.weight")]
        assert scale.shape == (up.shape[0], *[1] * (up.ndim - 1))  # [out, 1] or [out, 1, 1, 1]: per output feature
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}
    ours = _ours(model_dir, lora.parent, tmp_path / "ours.png")

    peft = tmp_path / "peft" / "sks.safetensors"
    assert main(["convert", str(lora), str(peft), "--to", "diffusers", "--model", str(model_dir)]) == 0
    assert np.abs(ours - _diffusers(model_dir, peft)).max() <= 1 / 255 + 1e-6
    assert np.array_equal(_ours(model_dir, peft.parent, tmp_path / "peft.png"), ours)
    back = tmp_path / "back" / "sks.safetensors"
    assert main(["convert", str(peft), str(back), "--to", "kohya", "--model", str(model_dir)]) == 0
    again, _ = load_artifact(back)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
