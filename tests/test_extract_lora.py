"""extract-lora: SVD of tuned - base weights. Full rank reproduces the tuned model; a low-rank file loads
in diffusers' own LoRA loader and equals the truncated SVD; the reported kept norm is the SVD's."""

from __future__ import annotations

import math

import pytest
import torch

from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.extract_lora import extract_lora
from sdtune.methods.lora import LoRA, encode_state
from sdtune.model import load

# fp32 SVD of 32..64-wide matrices and a 4-step sampler: measured max |UNet output diff| ~1e-6.
UNET_TOLERANCE = 1e-4
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _tuned(family: str = "sd1", seed: int = 0):
    """The base model with random full-rank changes to every attention projection (UNet and text encoder),
    the layers a LoRA can carry."""
    model = load(f"tiny:{family}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component in ("unet", "text_encoder"):
            for name, module in model.components()[component].named_modules():
                if name.endswith(ATTENTION + ("q_proj", "k_proj", "v_proj", "out_proj")):
                    module.weight += 0.05 * torch.randn(module.weight.shape, generator=gen)
    return model


def _unet_output(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    ids = model.tokenizer(["a photo of sks dog", "a red circle"], padding="max_length", return_tensors="pt",
                          max_length=model.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        text = model.text_encoder(ids)[0]
        return model.unet(latents, torch.tensor([10, 500]), text).sample


def test_full_rank_lora_reproduces_the_tuned_model(tmp_path):
    from sdtune.artifacts import save_artifact

    base, tuned = load("tiny:sd1"), _tuned()
    state, report = extract_lora(base, tuned, rank=64)
    assert report.kept == pytest.approx(1.0, abs=1e-6) and report.covered == pytest.approx(1.0, abs=1e-6)
    tensors, _ = encode_state(state, "kohya", base)  # through the kohya file, as users get it
    path = save_artifact(tmp_path / "full.safetensors", tensors, {})
    file_tensors, metadata = load_artifact(path)
    lora = LoRA()
    lora.apply(base, lora.decode_file(base, file_tensors, metadata, path), 1.0, name="full")
    diff = (_unet_output(base) - _unet_output(tuned)).abs().max().item()
    assert diff < UNET_TOLERANCE, diff


def test_low_rank_lora_loads_in_diffusers_and_equals_the_truncated_svd(tiny_pipeline_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtune.artifacts import save_artifact

    base_dir = tiny_pipeline_dirs["sd1"]
    base, tuned, reference = load(str(base_dir)), _tuned(), load(str(base_dir))
    rank = 2
    state, report = extract_lora(base, tuned, rank=rank, alpha=1.0)
    kept_sq = total_sq = 0.0
    with torch.no_grad():  # the reference: base + rank-2 truncation of each difference, by its own SVD
        for component in ("unet", "text_encoder"):
            tuned_modules = dict(tuned.components()[component].named_modules())
            for name, module in reference.components()[component].named_modules():
                if f"{component}.{name}.lora_A.weight" in state:
                    delta = tuned_modules[name].weight - module.weight
                    u, s, vh = torch.linalg.svd(delta)
                    module.weight += u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
                    kept_sq, total_sq = kept_sq + float((s[:rank] ** 2).sum()), total_sq + float((s ** 2).sum())
    assert report.kept == pytest.approx(math.sqrt(kept_sq / total_sq), rel=1e-4)
    assert 0.2 < report.kept < 0.9
    assert all(float(v) == 1.0 for k, v in state.items() if k.endswith(".alpha"))

    tensors, _ = encode_state(state, "kohya", base)
    path = save_artifact(tmp_path / "low.safetensors", tensors, {})
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    theirs = load(str(base_dir))
    theirs.unet, theirs.text_encoders = pipe.unet, [pipe.text_encoder]
    diff = (_unet_output(theirs) - _unet_output(reference)).abs().max().item()
    assert diff < UNET_TOLERANCE, diff
    assert (_unet_output(theirs) - _unet_output(base)).abs().max().item() > 100 * UNET_TOLERANCE


def test_cli_extracts_a_dreambooth_result_and_reports_what_the_rank_keeps(tiny_pipeline_dirs, subject_dir,
                                                                          tmp_path, capsys):
    base_dir = tiny_pipeline_dirs["sd2"]
    assert main(["train", "dreambooth", "--model", str(base_dir), "--images", str(subject_dir), "--token", "sks",
                 "--class-word", "dog", "--steps", "2", "--lr", "1e-3", "--output", str(tmp_path / "db"),
                 "--train-text-encoder", "--quiet", "--log-dir", "none"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "db" / "sks"), str(tmp_path / "db" / "sks.safetensors")]
    out = tmp_path / "sks-lora.safetensors"
    assert main(["extract-lora", "--base", str(base_dir), "--tuned", str(tmp_path / "db" / "sks"),
                 "--rank", "4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "keeps" in text and "relative Frobenius norm" in text and str(out) in text
    tensors, metadata = load_artifact(out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors)  # the text encoder trained, so it is extracted
    assert metadata["lora_rank"] == "4" and float(metadata["kept_norm_fraction"]) < 1.0
    # The file works where LoRAs are used: sdtune's generate applies it by name.
    image = tmp_path / "img.png"
    assert main(["generate", "--model", str(base_dir), "--prompt", "a sks dog <lora:sks-lora:1>",
                 "--artifacts", str(tmp_path), "--steps", "2", "--output", str(image)]) == 0
    assert image.is_file()


def test_identical_models_have_nothing_to_extract():
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="no difference"):
        extract_lora(load("tiny:sd1"), load("tiny:sd1"), rank=4)
    with pytest.raises(SdtuneError, match="pass its own base"):
        extract_lora(load("tiny:sd1"), load("tiny:sd2"), rank=4)
