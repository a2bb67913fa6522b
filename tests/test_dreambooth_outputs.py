"""DreamBooth's two artifacts: the pipeline folder and the LDM-layout single file load back (through diffusers
and through sdtune) and draw the same image as the model in memory; the key layout matches diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.config import DataConfig, TrainConfig
from sdtune.formats.checkpoint import from_checkpoint, to_checkpoint
from sdtune.methods.dreambooth import DreamBooth, DreamBoothConfig
from sdtune.model import SDModel, load

TOLERANCE = 1 / 255 + 1e-6


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=4, generator=torch.Generator().manual_seed(2)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_and_single_file_draw_what_the_trained_model_draws(tiny_pipeline_dirs, subject_dir, tmp_path, family):
    from diffusers import StableDiffusionPipeline

    from sdtune.artifacts import load_artifact
    from sdtune.train import train

    base_dir = tiny_pipeline_dirs[family]
    model = load(str(base_dir))
    base_image = _image(model.pipeline())
    cfg = DreamBoothConfig(train_text_encoder=True)
    result = train(model, DreamBooth(cfg), TrainConfig(steps=2, lr=2e-3, batch_size=2, log_dir="none"),
                   DataConfig(images=str(subject_dir), token="sks", class_word="dog"), tmp_path, "sks", progress=False)
    folder, single = result.paths
    assert folder == tmp_path / "sks" and single == tmp_path / "sks.safetensors"
    ours = _image(model.pipeline())
    assert np.abs(ours - base_image).max() > 4 / 255, "training should change the image"

    from_folder = _image(StableDiffusionPipeline.from_pretrained(str(folder)))
    via_sdtune = _image(load(str(single), config=str(base_dir)).pipeline())
    via_diffusers = _image(StableDiffusionPipeline.from_single_file(str(single), config=str(base_dir),
                                                                    local_files_only=True))
    for other in (from_folder, via_sdtune, via_diffusers):
        assert np.abs(ours - other).max() <= TOLERANCE

    tensors, metadata = load_artifact(single)
    assert metadata["method"] == "dreambooth" and metadata["base_family"] == family
    assert metadata["dreambooth_train_text_encoder"] == "true" and "config" in metadata
    text_key = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                "sd2": "cond_stage_model.model.ln_final.weight"}[family]
    assert text_key in tensors and "model.diffusion_model.out.2.weight" in tensors
    assert "first_stage_model.decoder.conv_out.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert (folder / "sdtune_run_card.json").is_file() and not list(tmp_path.glob(".sks*"))


def test_save_dtype_applies_to_both_outputs(tmp_path):
    from safetensors import safe_open

    model = load("tiny:sd1")
    paths = DreamBooth(DreamBoothConfig(save_dtype="fp16")).save(model, tmp_path, "half", {"method": "dreambooth"})
    weight_files = [paths[1], *paths[0].rglob("*.safetensors")]
    assert len(weight_files) == 4
    for path in weight_files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    reloaded = load(str(paths[0]), dtype=torch.float32)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(reloaded.unet.state_dict()[key], value.half().float())


def _tiny_sdxl_with_distinct_text_widths() -> SDModel:
    """tiny:sdxl with a wider second text encoder: diffusers' single-file loader tells SDXL's two encoders
    apart by width (768 / 1280 in the real model), so the two must differ for it to load them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base = load("tiny:sdxl")
    wide = CLIPTextConfig(**{**base.text_encoders[1].config.to_dict(), "hidden_size": 48,
                             "intermediate_size": 96, "projection_dim": 48})
    torch.manual_seed(0)
    encoder_2 = CLIPTextModelWithProjection(wide).eval()
    unet_config = {**base.unet.config, "cross_attention_dim": 32 + 48,
                   "projection_class_embeddings_input_dim": 6 * 8 + 48}
    unet = UNet2DConditionModel.from_config(unet_config).eval()
    return SDModel("sdxl", "epsilon", unet, base.vae, [base.text_encoder, encoder_2], base.tokenizers,
                   base.scheduler, "tiny:sdxl-wide")


def test_sdxl_outputs_use_the_sgm_layout_and_load_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = _tiny_sdxl_with_distinct_text_widths()
    folder, single = DreamBooth().save(model, tmp_path, "xl", {"method": "dreambooth"})
    keys = to_checkpoint(model).keys()
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    for pipe in (StableDiffusionXLPipeline.from_pretrained(str(folder)),
                 StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)):
        loaded = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
                  "text_encoder_2": pipe.text_encoder_2}
        for name, module in model.components().items():
            theirs = loaded[name].state_dict()
            for key, value in module.state_dict().items():
                assert torch.equal(theirs[key], value), f"{name}.{key}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_layout_round_trips_bit_exactly(family):
    from sdtune.formats.checkpoint import load_checkpoint
    from sdtune.model import build_from_config

    model = load(f"tiny:{family}")
    checkpoint = to_checkpoint(model)
    back = from_checkpoint(checkpoint, model)
    other = build_from_config(f"tiny:{family}", seed=1)  # other weights, same architecture
    load_checkpoint(other, {**checkpoint, "model_ema.decay": torch.tensor(0.9999)})  # extras are ignored
    for name, module in model.components().items():
        ours, theirs = module.state_dict(), other.components()[name].state_dict()
        assert back[name].keys() == ours.keys()
        assert all(torch.equal(back[name][k], v) and torch.equal(theirs[k], v) for k, v in ours.items()), name


def test_a_checkpoint_of_another_family_is_refused():
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError):
        from_checkpoint(to_checkpoint(load("tiny:sd1")), load("tiny:sd2"))
