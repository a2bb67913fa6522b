"""Single-file base checkpoints (LDM/SGM layout, as civitai and the original releases ship them) load offline
with no --model-config: the architecture is read from the file, the tokenizers are CLIP's, and SD 2.x's
prediction type follows the documented rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtune.cli import main
from sdtune.formats.checkpoint import to_checkpoint
from sdtune.model import SDModel, build_modules, load, make_scheduler
from sdtune.single_file import V_TEST_KEY, prediction_type
from sdtune.tokenizer_build import EOS, OPENCLIP_PAD, clip_tokenizer

TRAIN = ["train", "lora", "--token", "sks", "--class-word", "dog", "--steps", "2", "--quiet", "--log-dir", "none"]


def _write(model: SDModel, path, metadata: dict[str, str] | None = None):
    """The model as a bare LDM-layout file, with no run card (as a checkpoint from elsewhere comes)."""
    save_file({k: v.contiguous() for k, v in to_checkpoint(model).items()}, str(path), metadata)
    return path


def _small_real(family: str, text_layers: int = 2) -> SDModel:
    """A small model built by the published families' rules (CLIP's 49408-token vocabulary, 64-channel heads,
    SD1's 8 UNet heads), unlike tiny:*, whose head counts no rule can recover from shapes."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=1,
                max_position_embeddings=77, projection_dim=64, vocab_size=49408)
    unet = dict(block_out_channels=(64, 128), layers_per_block=1, sample_size=8, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64)
    vae = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)
    if family == "sd1":
        arch = dict(unet=dict(unet, attention_head_dim=8), text=[dict(text, hidden_act="quick_gelu")],
                    scheduler="PNDMScheduler", pads=[EOS])
    elif family == "sd2":
        arch = dict(unet=dict(unet, attention_head_dim=(1, 2), use_linear_projection=True),
                    text=[dict(text, hidden_act="gelu")], scheduler="DDIMScheduler", pads=[OPENCLIP_PAD])
    else:
        arch = dict(unet=dict(unet, attention_head_dim=(1, 2), use_linear_projection=True, cross_attention_dim=128,
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                              addition_embed_type="text_time", addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=6 * 8 + 64),
                    text=[dict(text, hidden_act="quick_gelu"), dict(text, hidden_act="gelu")],
                    scheduler="EulerDiscreteScheduler", pads=[EOS, OPENCLIP_PAD])
        vae = dict(vae, scaling_factor=0.13025)  # SDXL's VAE latents are scaled unlike SD 1.x/2.x's
    arch.update(family=family, vae=vae)
    tokenizers = [clip_tokenizer(pad) for pad in arch["pads"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet_m, vae_m, encoders = build_modules(arch, tokenizers)
        for module in (unet_m, vae_m):  # zero-initialised norms and outputs would hide a misread architecture
            for p in module.parameters():
                p.data.add_(torch.randn_like(p) * 0.05)
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    model = SDModel(family, prediction, unet_m, vae_m, encoders, tokenizers, make_scheduler(arch["scheduler"], prediction),
                    f"small:{family}")
    for module in model.components().values():
        module.eval()
    return model


def _image(model: SDModel) -> np.ndarray:
    out = model.pipeline()("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="np",
                           generator=torch.Generator().manual_seed(0))
    return out.images[0]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_checkpoint_loads_as_the_model_it_was_written_from(tmp_path, family):
    original = _small_real(family)
    loaded = load(str(_write(original, tmp_path / f"{family}.safetensors")))
    assert loaded.family == family
    for name, module in original.components().items():
        want, got = module.state_dict(), loaded.components()[name].state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in original.tokenizers]
    np.testing.assert_array_equal(_image(loaded), _image(original))  # same heads, activations, scheduler


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_tiny_checkpoint_loads_as_its_tiny_architecture(tmp_path, family):
    original = load(f"tiny:{family}")
    loaded = load(str(_write(original, tmp_path / "tiny.safetensors")))
    assert loaded.unet.config.attention_head_dim == original.unet.config.attention_head_dim
    assert loaded.resolution == original.resolution
    np.testing.assert_array_equal(_image(loaded), _image(original))


def test_sd2_conditions_on_the_penultimate_block_of_a_whole_openclip_tower(tmp_path):
    """SD 2.x files carry OpenCLIP-H's 24 blocks and use 23 (LDM's `layer: penultimate`), as diffusers does."""
    whole = _small_real("sd2", text_layers=24)
    loaded = load(str(_write(whole, tmp_path / "sd2.safetensors")))
    assert loaded.text_encoder.config.num_hidden_layers == 23
    got, want = loaded.text_encoder.state_dict(), whole.text_encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got) and any(".23." in k for k in want)


def test_the_tokenizers_are_clips_own():
    """Token ids of the published CLIP vocabulary; OpenCLIP (SD2, SDXL's second encoder) pads with "!" (0)."""
    ids = clip_tokenizer()("a photo of an astronaut riding a horse", padding="max_length", max_length=12).input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407, 49407, 49407]
    assert clip_tokenizer(OPENCLIP_PAD)("a cat", padding="max_length", max_length=6).input_ids == [
        49406, 320, 2368, 49407, 0, 0]


def _sd2_unet(in_channels: int = 4, bias_std: float = 0.0) -> dict[str, torch.Tensor]:
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3)}
    sd[V_TEST_KEY] = torch.randn(1280, generator=torch.Generator().manual_seed(0)) * bias_std
    return sd


@pytest.mark.parametrize("sd, metadata, step, expected", [
    (_sd2_unet(bias_std=0.2), {}, None, "v_prediction"),  # 768-v weights: ComfyUI's statistic
    (_sd2_unet(bias_std=0.02), {}, None, "epsilon"),  # 512-base weights
    (_sd2_unet(bias_std=0.2), {}, 875000, "epsilon"),  # the SD 2.0-base release .ckpt
    (_sd2_unet(in_channels=9, bias_std=0.2), {}, None, "epsilon"),  # inpainting models are epsilon
    (_sd2_unet(bias_std=0.02), {"modelspec.architecture": "stable-diffusion-v2-768-v"}, None, "v_prediction"),
    (_sd2_unet(bias_std=0.2), {"modelspec.prediction_type": "epsilon"}, None, "epsilon"),
    ({**_sd2_unet(bias_std=0.02), "v_pred": torch.tensor([])}, {}, None, "v_prediction"),
])
def test_sd2_prediction_type_rule(sd, metadata, step, expected):
    assert prediction_type(sd, metadata, "sd2", step) == expected


def test_sd2_prediction_type_reaches_the_loaded_model(tmp_path):
    model = load("tiny:sd2")
    as_v = load(str(_write(model, tmp_path / "v.safetensors")))
    as_eps = load(str(_write(model, tmp_path / "eps.safetensors", {"modelspec.architecture": "stable-diffusion-v2-512"})))
    assert (as_v.prediction_type, as_v.noise_scheduler().config.prediction_type) == ("v_prediction",) * 2
    assert (as_eps.prediction_type, as_eps.noise_scheduler().config.prediction_type) == ("epsilon",) * 2
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": to_checkpoint(model), "global_step": 875000}, ckpt)
    assert load(str(ckpt)).prediction_type == "epsilon"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_train_lora_and_generate_on_a_checkpoint_file(tmp_path, subject_dir, family):
    checkpoint = _write(load(f"tiny:{family}"), tmp_path / f"{family}.safetensors")
    out = tmp_path / "lora"
    assert main(TRAIN + ["--model", str(checkpoint), "--images", str(subject_dir), "--output", str(out),
                         "--lr", "0.05"]) == 0
    images = {}
    for tag in ("", " <lora:sks:1>"):
        png = tmp_path / f"img{len(tag)}.png"
        assert main(["generate", "--model", str(checkpoint), "--prompt", "a photo of sks dog" + tag, "--steps", "2",
                     "--artifacts", str(out), "--output", str(png)]) == 0
        images[tag] = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(images[""] - images[" <lora:sks:1>"]).max() > 0  # the LoRA trained on the file changes it


def _error(capsys, path) -> str:
    assert main(["generate", "--model", str(path), "--prompt", "a dog", "--output", str(path.with_suffix(".png"))]) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not path.with_suffix(".png").exists()
    return err


def test_files_that_are_not_checkpoints_are_refused_in_one_sentence(tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    assert "no UNet weights" in _error(capsys, lora)
    sd = to_checkpoint(load("tiny:sd1"))
    no_text = tmp_path / "unet_vae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, str(no_text))
    assert "no text encoder" in _error(capsys, no_text)
    mixed = tmp_path / "mixed.safetensors"
    xl_text = {k: v for k, v in to_checkpoint(load("tiny:sdxl")).items() if k.startswith("conditioner.")}
    save_file({**{k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, **xl_text}, str(mixed))
    assert "mixes parts of different models" in _error(capsys, mixed)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != "model.diffusion_model.input_blocks.0.0.weight"}, str(partial))
    assert "input_blocks.0.0.weight" in _error(capsys, partial)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "unet_vae.safetensors").read_bytes()[:5000])
    assert "cut.safetensors" in _error(capsys, truncated)


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@pytest.mark.parametrize("spec", ["random:sd15", "random:sd2", "random:sdxl"])
def test_full_size_layouts_are_read_as_the_published_architectures(spec):
    """On the meta device (names and shapes only): SD 1.5, SD 2.x and SDXL base files are read back as the
    published configurations, heads included (SDXL's 1/2/10-deep transformers, SD2's 64-channel heads)."""
    from sdtune.checkpoint_arch import detect_family, infer_architecture
    from sdtune.model import build_from_config

    model = build_from_config(spec, device="meta")
    arch = infer_architecture(to_checkpoint(model), detect_family(to_checkpoint(model), spec))
    assert arch["family"] == model.family
    unet, n = model.unet.config, len(model.unet.config.block_out_channels)
    for field in ("attention_head_dim", "transformer_layers_per_block", "block_out_channels", "layers_per_block",
                  "cross_attention_dim", "use_linear_projection", "down_block_types", "up_block_types"):
        assert _per_block(arch["unet"][field], n) == _per_block(unet[field], n), field
    assert arch["unet"].get("addition_time_embed_dim") == unet.get("addition_time_embed_dim")
    fields = ("num_attention_heads", "num_hidden_layers", "hidden_act", "hidden_size", "intermediate_size")
    for text, encoder in zip(arch["text"], model.text_encoders):
        assert {k: getattr(encoder.config, k) for k in fields} == {k: text[k] for k in fields}
