"""SDXL through the same loop: LoRA files diffusers loads, with kohya's SDXL names and ecosystem metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.artifacts import load_artifact
from sdtune.cli import main


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_lora_with_text_encoders_matches_diffusers(tiny_pipeline_dirs, subject_dir, tmp_path, fmt):
    from diffusers import DiffusionPipeline

    model_dir, out = tiny_pipeline_dirs["sdxl"], tmp_path / fmt
    assert main(["train", "lora", "--model", str(model_dir), "--images", str(subject_dir), "--token", "sks",
                 "--steps", "3", "--lr", "3e-2", "--output", str(out), "--format", fmt, "--quiet",
                 "--log-dir", "none", "--train-text-encoder"]) == 0
    tensors, metadata = load_artifact(out / "sks.safetensors")
    if fmt == "kohya":
        assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
        assert any(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_") for k in tensors)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_module"] == "networks.lora"

    assert main(["generate", "--model", str(model_dir), "--prompt", "a sks dog <lora:sks:1>", "--artifacts",
                 str(out), "--steps", "5", "--seed", "3", "--output", str(out / "ours.png")]) == 0
    ours = np.asarray(Image.open(out / "ours.png"), dtype=np.float32) / 255
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: np.asarray(pipe("a sks dog", num_inference_steps=5,  # noqa: E731
                                  generator=torch.Generator().manual_seed(3)).images[0], dtype=np.float32) / 255
    base = run()
    pipe.load_lora_weights(str(out / "sks.safetensors"))
    theirs = run()
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - base).max() > 4 / 255


def test_sd2_metadata_says_v_prediction(tiny_pipeline_dirs, subject_dir, tmp_path):
    assert main(["train", "lora", "--model", "tiny:sd2", "--images", str(subject_dir), "--token", "sks",
                 "--steps", "1", "--output", str(tmp_path), "--quiet", "--log-dir", "none"]) == 0
    _, metadata = load_artifact(tmp_path / "sks.safetensors")
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_v2"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
