"""`sdtune inspect` says how each generator loads a file, and `convert --for CLIENT` writes the layout that loads
there. The verdicts come from rules declared with the layouts; these tests hold them against the clients: diffusers
itself (installed), and the key mappings of ComfyUI (comfy/lora.py), A1111 (extensions-builtin/Lora/networks.py)
and kohya (networks/lora.py) re-implemented here from reading their code, independently of sdtune's rule tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_subject_images
from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.formats.lora import detect_lora_format
from sdtune.inspection import describe_artifact
from sdtune.lora_inspection import _split
from sdtune.model import load

TRAIN = ["train", "lora", "--model", "tiny:sd1", "--steps", "1", "--log-dir", "none", "--name", "x", "--quiet"]
COMFY_CLIP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LoRA files of a tiny SD1 model, trained one step each: name -> path."""
    root = tmp_path_factory.mktemp("clients")
    images = make_subject_images(root / "subject")
    flags = {
        "kohya-io": ["--format", "kohya", "--lora-targets", "attn,ff,conv,time,io,resample", "--train-text-encoder"],
        "diffusers": ["--format", "diffusers", "--lora-targets", "attn,conv", "--train-text-encoder", "--alpha", "2"],
        "kohya-dora": ["--format", "kohya", "--dora"],
    }
    out = {}
    for name, extra in flags.items():
        assert main(TRAIN + ["--images", str(images), "--output", str(root / name), *extra]) == 0
        out[name] = root / name / "x.safetensors"
    return out


def _verdicts(path: Path) -> dict[str, tuple[str, str]]:
    """inspect's "loads in:" block: client name -> (fully|partly|no, detail)."""
    text = describe_artifact(path)
    block = text.split("\nloads in:\n", 1)[1].splitlines()
    found = {}
    for line in block:
        name, _, rest = line.strip().partition(":")
        level, _, detail = rest.strip().partition(": ")
        found[name] = (level, detail)
    return found


def _modules(path: Path) -> set[tuple[str, str]]:
    tensors, _ = load_artifact(path)
    return {_split(key)[:2] for key in tensors}


def _comfyui_keys(model) -> set[str]:
    """The LoRA names ComfyUI's model_lora_keys_unet/_clip give an SD1 model: kohya names of every UNet weight (LDM
    and diffusers spellings), diffusers UNet names with attention as `processor.to_*`, and per CLIP layer its six
    projections in kohya and diffusers spellings."""
    keys = set()
    for name, param in model.unet.named_parameters():
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            keys.add("lora_unet_" + module.replace(".", "_"))
            for prefix in ("", "unet."):
                diffusers = prefix + module.replace(".to_", ".processor.to_")
                keys.add(diffusers[:-2] if diffusers.endswith(".to_out.0") else diffusers)
    for layer in range(model.text_encoder.config.num_hidden_layers):
        for part in COMFY_CLIP:
            keys.add(f"lora_te_text_model_encoder_layers_{layer}_{part.replace('.', '_')}")
            keys.add(f"text_encoder.text_model.encoder.layers.{layer}.{part}")
    return keys


def _kohya_modules(model) -> set[str]:
    """The modules kohya's networks/lora.py builds for an SD1 model: Linear/Conv2d layers inside Transformer2DModel,
    ResnetBlock2D, Downsample2D, Upsample2D (U-Net) and CLIPAttention/CLIPMLP (text encoder, under transformers
    4.x's `text_model.` names, which its scripts use)."""
    names = set()
    roots = (("lora_unet", model.unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"), ""),
             ("lora_te", model.text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), "text_model."))
    for prefix, root, targets, nest in roots:
        for name, module in root.named_modules():
            if type(module).__name__ in targets:
                for child, layer in module.named_modules():
                    if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and child:
                        path = name if name.startswith(nest) else nest + name
                        names.add(f"{prefix}_{path}.{child}".replace(".", "_"))
    return names


def _file_module_names(path: Path) -> set[str]:
    tensors, _ = load_artifact(path)
    return {key.rsplit(".", 2)[0] if re.search(r"\.lora_[AB]\.weight$|\.lora_(up|down)\.weight$", key)
            else key.rsplit(".", 1)[0] for key in tensors}


def _diffusers_layers(pipe_dir: Path, path: Path) -> int:
    """How many layers diffusers' own load_lora_weights wraps with the file."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return sum(isinstance(m, BaseTunerLayer) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


def test_diffusers_layout_loads_fully_in_diffusers_partly_in_comfyui_not_in_a1111(files, tiny_pipeline_dirs):
    path = files["diffusers"]
    verdicts = _verdicts(path)
    model = load("tiny:sd1")
    modules = _file_module_names(path)
    comfy_missing = modules - _comfyui_keys(model)
    assert comfy_missing and all(re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", m) for m in comfy_missing)
    assert verdicts["ComfyUI"][0] == verdicts["Forge"][0] == "partly"
    assert f"UNet attention layers (read only as `processor.to_*`) x{len(comfy_missing)}" in verdicts["ComfyUI"][1]
    assert "alpha = rank" in verdicts["ComfyUI"][1]  # trained at alpha 2, rank 4: its header alpha is not read
    # A1111 cuts a key at its first '.', so every key names the module "unet" or "text_encoder": nothing matches
    assert {m.partition(".")[0] for m in modules} == {"unet", "text_encoder"}
    assert verdicts["AUTOMATIC1111"][0] == "no" and verdicts["kohya sd-scripts"][0] == "no"
    assert verdicts["diffusers"] == ("fully", "")
    assert _diffusers_layers(tiny_pipeline_dirs["sd1"], path) == len(modules)


def test_kohya_layout_with_io_loads_fully_in_a1111_comfyui_diffusers_and_partly_in_kohya(files, tiny_pipeline_dirs):
    path = files["kohya-io"]
    verdicts = _verdicts(path)
    model = load("tiny:sd1")
    modules = _file_module_names(path)
    assert not modules - _comfyui_keys(model)
    kohya_missing = modules - _kohya_modules(model)
    assert kohya_missing == {"lora_unet_conv_in", "lora_unet_conv_out"}
    assert {c: v[0] for c, v in verdicts.items()} == {"AUTOMATIC1111": "fully", "Forge": "fully", "ComfyUI": "fully",
                                                       "kohya sd-scripts": "partly", "diffusers": "fully"}
    assert verdicts["kohya sd-scripts"][1] == "conv_in/conv_out (outside the blocks networks.lora wraps) x2"
    assert _diffusers_layers(tiny_pipeline_dirs["sd1"], path) == len(modules)


def test_per_output_dora_is_misapplied_by_a1111_and_loads_in_diffusers(files, tiny_pipeline_dirs):
    path = files["kohya-dora"]
    verdicts = _verdicts(path)
    layers = len(_modules(path))
    assert verdicts["AUTOMATIC1111"] == ("partly", f"per-output DoRA layers (A1111 normalises per input feature) "
                                                   f"x{layers}")
    assert verdicts["kohya sd-scripts"][0] == "partly" and verdicts["diffusers"] == ("fully", "")
    assert _diffusers_layers(tiny_pipeline_dirs["sd1"], path) == layers


def test_convert_for_a_client_writes_the_layout_that_loads_there(files, tmp_path, capsys):
    src = files["diffusers"]
    out = tmp_path / "comfy" / "x.safetensors"
    assert main(["convert", str(src), str(out), "--for", "comfyui"]) == 0
    tensors, _ = load_artifact(out)
    assert detect_lora_format(tensors) == "kohya"
    assert not _file_module_names(out) - _comfyui_keys(load("tiny:sd1"))
    assert _verdicts(out)["ComfyUI"] == ("fully", "")
    capsys.readouterr()
    assert main(["convert", str(out), str(tmp_path / "d" / "x.safetensors"), "--to", "diffusers",
                 "--for", "ComfyUI"]) == 0
    err = capsys.readouterr().err
    assert "ComfyUI loads the diffusers layout partly" in err and "--to kohya loads fully in ComfyUI" in err
    assert main(["convert", str(out), str(tmp_path / "e" / "x.safetensors"), "--for", "diffusers"]) == 0
    assert detect_lora_format(load_artifact(tmp_path / "e" / "x.safetensors")[0]) == "diffusers"
    with pytest.raises(SystemExit) as refused:
        main(["convert", str(out), str(tmp_path / "f.safetensors"), "--for", "invokeai"])
    assert refused.value.code == 2 and "invalid choice: 'invokeai'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, expected", [
    ("a1111", {"AUTOMATIC1111": "fully", "Forge": "fully", "ComfyUI": "fully", "kohya sd-scripts": "no",
               "diffusers": "no"}),
    ("sdtune", {"AUTOMATIC1111": "no", "Forge": "no", "ComfyUI": "no", "kohya sd-scripts": "no", "diffusers": "no"}),
])
def test_hypernetworks_load_in_a1111_forge_and_comfyui_as_pt_only(subject_dir, tmp_path, fmt, expected):
    assert main(["train", "hypernetwork", "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "1",
                 "--log-dir", "none", "--output", str(tmp_path), "--name", "h", "--format", fmt, "--quiet"]) == 0
    path = tmp_path / ("h.pt" if fmt == "a1111" else "h.safetensors")
    verdicts = _verdicts(path)
    assert {c: v[0] for c, v in verdicts.items()} == expected
    if fmt == "sdtune":
        assert "convert --to a1111" in verdicts["AUTOMATIC1111"][1]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embeddings_load_everywhere_and_diffusers_needs_a_call_per_sdxl_encoder(subject_dir, tmp_path, family):
    assert main(["train", "textual-inversion", "--model", f"tiny:{family}", "--images", str(subject_dir), "--steps",
                 "1", "--log-dir", "none", "--output", str(tmp_path), "--format", "a1111", "--token", "zwx-toy",
                 "--quiet"]) == 0
    verdicts = _verdicts(next(tmp_path.glob("*.pt")))
    assert {v[0] for v in verdicts.values()} == {"fully"}
    assert ("text_encoder_2" in verdicts["diffusers"][1]) == (family == "sdxl")


def _pixels(path: Path) -> torch.Tensor:
    return torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32)


def test_dreambooth_single_file_generates_from_its_run_card_and_names_its_layout(subject_dir, tmp_path, capsys):
    assert main(["train", "dreambooth", "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "2",
                 "--lr", "1e-3", "--log-dir", "none", "--output", str(tmp_path), "--name", "sks", "--quiet"]) == 0
    images = {}
    for name, model in (("folder", tmp_path / "sks"), ("file", tmp_path / "sks.safetensors"), ("base", "tiny:sd1")):
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--model", str(model), "--prompt", "a sks", "--steps", "2", "--output", str(out)]) == 0
        images[name] = _pixels(out)
    assert torch.equal(images["file"], images["folder"])  # no --model-config: the card's base took the file's weights
    assert not torch.equal(images["file"], images["base"])
    text = describe_artifact(tmp_path / "sks.safetensors")
    assert "format:     Stable Diffusion checkpoint (A1111 / LDM single-file layout)" in text
    assert "sdtune dreambooth artifact" not in text
    assert all(v == ("fully", "") for v in _verdicts(tmp_path / "sks.safetensors").values())
