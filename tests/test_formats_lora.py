"""LoRA state dicts between sdtune, kohya and diffusers layouts; interop proven with diffusers' loaders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdtune.artifacts import load_artifact, save_artifact
from sdtune.errors import SdtuneError
from sdtune.formats import sniff_format
from sdtune.formats.ldm_names import (
    diffusers_to_ldm_unet_names,
    ldm_to_diffusers_unet_names,
    unet_state_dict_from_ldm,
    unet_state_dict_to_ldm,
)
from sdtune.formats.lora import (check_lora_family, checked_state, detect_lora_format, from_kohya, lora_family_hints,
                                 to_kohya)
from sdtune.formats.lora_diffusers import LORA_ADAPTER_METADATA_KEY, from_diffusers, to_diffusers

SD1_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
SDXL_UNET = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
    sample_size=16, transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)  # fmt: skip
CLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
)  # fmt: skip
UNET_TARGETS = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "to_out.0", "proj_in", "resnets.0.conv1")
TE_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def _sd1():
    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**SD1_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP))}


def _sdxl():
    torch.manual_seed(0)
    return {
        "unet": UNet2DConditionModel(**SDXL_UNET),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)),
    }


@pytest.fixture(scope="module")
def sd1():
    return _sd1()


@pytest.fixture(scope="module")
def sdxl():
    return _sdxl()


def _paths(models):
    return {c: {n for n, _ in m.named_modules()} for c, m in models.items()}


def _lora_state(models, dtype=torch.float32, mixed_alpha=True):
    """A canonical state with mixed ranks (4 and 2) and alphas (8 and 1.5), all different from the rank."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for component, model in models.items():
        targets = UNET_TARGETS if component == "unet" else TE_TARGETS
        names = [n for n, _ in model.named_modules() if n.endswith(targets)]
        for i, name in enumerate(names):
            mod = model.get_submodule(name)
            r = 2 if i % 3 == 0 else 4
            if isinstance(mod, torch.nn.Conv2d):
                a = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=gen)
                b = torch.randn(mod.out_channels, r, 1, 1, generator=gen)
            else:
                a, b = torch.randn(r, mod.in_features, generator=gen), torch.randn(mod.out_features, r, generator=gen)
            state[f"{component}.{name}.lora_A.weight"] = a.to(dtype)
            state[f"{component}.{name}.lora_B.weight"] = b.to(dtype)
            state[f"{component}.{name}.alpha"] = torch.tensor(1.5 if mixed_alpha and i % 4 == 1 else 8.0)
    return state


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), key


def _expected_delta(state, key_base):
    a, b = state[f"{key_base}.lora_A.weight"].float(), state[f"{key_base}.lora_B.weight"].float()
    scale = state[f"{key_base}.alpha"].item() / a.shape[0]
    if a.ndim == 4:
        return scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    return scale * b @ a


def _pipeline(models):
    """A tiny SD1 or SDXL pipeline around the given components (no tokenizer needed to load LoRAs)."""
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)  # fmt: skip
    common = dict(vae=vae, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), tokenizer=None, **models)
    if "text_encoder_2" in models:
        return StableDiffusionXLPipeline(tokenizer_2=None, **common)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


def _check_loaded(models, state):
    """Every LoRA module diffusers injected applies exactly alpha/r * B @ A."""
    bases = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_A.weight")}
    for base in bases:
        component, path = base.split(".", 1)
        layer = models[component].get_submodule(path)
        assert isinstance(layer, LoraLayer), base
        delta = layer.get_delta_weight(layer.active_adapters[0])
        torch.testing.assert_close(delta, _expected_delta(state, base), rtol=1e-5, atol=1e-5)
    return len(bases)


# ------------------------------------------------------------------------------------------ kohya


def test_kohya_round_trip_is_bit_exact_with_alpha(sd1):
    state = _lora_state(sd1, torch.float16)
    kohya = to_kohya(state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya  # `text_model.` restored
    alphas = {k: v.item() for k, v in kohya.items() if k.endswith(".alpha")}
    assert set(alphas.values()) == {1.5, 8.0}
    _assert_same(from_kohya(kohya, _paths(sd1)), state)
    ldm = to_kohya(state, sd1["unet"].config, ldm_unet_names=True)  # old SD1 files in LDM spelling
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in ldm
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in ldm  # resnet conv1
    _assert_same(from_kohya(ldm, _paths(sd1), sd1["unet"].config), state)


def test_kohya_sdxl_uses_ldm_unet_names_and_te1_te2(sdxl):
    state = _lora_state(sdxl)
    kohya = to_kohya(state, sdxl["unet"].config)
    names = {k.split(".")[0] for k in kohya}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k" in names
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert any(n.startswith("lora_te1_text_model_") for n in names)
    assert any(n.startswith("lora_te2_text_model_") for n in names)
    assert detect_lora_format(kohya) == "kohya"
    assert lora_family_hints(kohya)["family"] == "sdxl"
    _assert_same(from_kohya(kohya, _paths(sdxl), sdxl["unet"].config), state)
    with pytest.raises(SdtuneError, match="LDM-style UNet names; pass the UNet config"):
        from_kohya(kohya, _paths(sdxl))


def test_kohya_missing_alpha_means_rank(sd1):
    state = _lora_state(sd1)
    kohya = {k: v for k, v in to_kohya(state).items() if not k.endswith(".alpha")}
    back = from_kohya(kohya, _paths(sd1))
    for key, value in back.items():
        if key.endswith(".alpha"):
            assert value.item() == back[key.replace(".alpha", ".lora_A.weight")].shape[0]


def test_kohya_file_loads_in_diffusers_with_alpha(sd1):
    # One alpha for all modules: diffusers 0.42.1 builds unmatched alpha_pattern keys from a kohya file
    # whose alphas differ per module (peft warns and falls back), so mixed alphas go via to_diffusers.
    models = _sd1()
    state = _lora_state(models, mixed_alpha=False)
    _pipeline(models).load_lora_weights(to_kohya(state))
    assert _check_loaded(models, state) > 20


def test_kohya_unknown_key_is_refused_by_name(sd1):
    kohya = {"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 2048), "lora_te2_x.alpha": torch.tensor(1.0)}
    with pytest.raises(SdtuneError, match=r"lora_unet_foo_bar.*names no module.*sdxl"):
        from_kohya(kohya, _paths(sd1))
    with pytest.raises(SdtuneError, match=r"lora_unet_conv_in.on_input.*LyCORIS IA3.*reads LoRA, LoCon, LoHa"):
        from_kohya({"lora_unet_conv_in.on_input": torch.zeros(1)}, _paths(sd1))
    with pytest.raises(SdtuneError, match=r"unet.conv_in lacks parameters of its LoHa update \(has hada_w1_a\)"):
        checked_state(from_kohya({"lora_unet_conv_in.hada_w1_a": torch.zeros(1)}, _paths(sd1)))


# -------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("make", [_sd1, _sdxl], ids=["sd1", "sdxl"])
def test_diffusers_round_trip_through_file(make, tmp_path):
    models = make()
    state = _lora_state(models)
    tensors, metadata = to_diffusers(state)
    assert not any(k.endswith(".alpha") for k in tensors)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    packed = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert packed["unet.lora_alpha"] == 8.0 and packed["unet.r"] == 4 and packed["unet.alpha_pattern"]
    path = save_artifact(tmp_path / "lora.safetensors", tensors, metadata)
    loaded, meta = load_artifact(path)
    assert detect_lora_format(loaded) == "diffusers"
    _assert_same(from_diffusers(loaded, meta, _paths(models)), state)
    assert sniff_format(loaded, meta) == "LoRA (diffusers / PEFT)"


@pytest.mark.parametrize("make", [_sd1, _sdxl], ids=["sd1", "sdxl"])
def test_diffusers_file_loads_with_diffusers_own_loader(make, tmp_path):
    """Mixed ranks and per-module alphas != rank reach peft through `lora_adapter_metadata`."""
    models = make()
    state = _lora_state(models)
    path = save_artifact(tmp_path / "lora.safetensors", *to_diffusers(state))
    _pipeline(models).load_lora_weights(str(path))
    assert _check_loaded(models, state) == len(state) // 3


def test_diffusers_file_without_metadata_means_scale_one(sd1):
    state = _lora_state(sd1)
    tensors, _ = to_diffusers(state)
    back = from_diffusers(tensors, None)
    for key, value in back.items():
        if key.endswith(".alpha"):
            assert value.item() == back[key.replace(".alpha", ".lora_A.weight")].shape[0]


def test_diffusers_component_missing_from_model_is_refused(sdxl, sd1):
    tensors, metadata = to_diffusers(_lora_state(sdxl))
    with pytest.raises(SdtuneError, match=r"names no module of this model \(the LoRA looks made for sdxl\)"):
        from_diffusers(tensors, metadata, _paths(sd1))
    te2 = {k: v for k, v in tensors.items() if k.startswith("text_encoder_2.")}
    with pytest.raises(SdtuneError, match="text_encoder_2"):
        from_diffusers(te2, metadata, _paths(sd1))


# -------------------------------------------------------------------------------- detection, hints


def test_detect_and_family_hints():
    sdtune_keys = ["unet.a.lora_A.weight", "unet.a.lora_B.weight", "unet.a.alpha"]
    assert detect_lora_format(sdtune_keys) == "sdtune"
    assert detect_lora_format(sdtune_keys[:2]) == "diffusers"
    with pytest.raises(SdtuneError, match="Not a LoRA"):
        detect_lora_format(["model.diffusion_model.out.2.weight"])
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert lora_family_hints({k: torch.zeros(4, 768)}) == {
        "family": "sd1", "context_dim": 768, "evidence": "cross-attention context width 768"
    }  # fmt: skip
    assert lora_family_hints({k: torch.zeros(4, 1024)})["family"] == "sd2"
    assert lora_family_hints({}, {"ss_base_model_version": "sdxl_base_v1-0"})["family"] == "sdxl"
    assert lora_family_hints({}, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"})["family"] == "sd2"
    hints = lora_family_hints({k: torch.zeros(4, 2048)})
    with pytest.raises(SdtuneError, match="width 2048.*use a LoRA made for sd1"):
        check_lora_family(hints, "sd1", 768)
    check_lora_family(hints, "sdxl", 2048)


# ------------------------------------------------------------------------------------- LDM names


@pytest.mark.parametrize("make", [_sd1, _sdxl], ids=["sd1", "sdxl"])
def test_ldm_name_table_matches_diffusers_single_file_conversion(make):
    unet = make()["unet"]
    sd = unet.state_dict()
    table = ldm_to_diffusers_unet_names(unet.config)
    assert {k.rsplit(".", 1)[0] for k in sd} == set(table.values())  # every module, nothing extra
    assert diffusers_to_ldm_unet_names(unet.config) == {v: k for k, v in table.items()}
    ldm = unet_state_dict_to_ldm(sd, unet.config)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == set(sd)
    for key, value in sd.items():
        assert torch.equal(converted[key], value), key
    _assert_same(unet_state_dict_from_ldm(ldm, unet.config), sd)


def test_ldm_table_refuses_unknown_block_types():
    cfg = dict(SD1_UNET, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(SdtuneError, match="SimpleCrossAttnDownBlock2D"):
        ldm_to_diffusers_unet_names(cfg)
