"""LoHa, LoKr and DoRA files trained by `sdtune train lora --algo/--dora` on tiny SD1 and SDXL: the image `generate`
makes with <lora:NAME:1> is the base pipeline's with the file's update added to its weights by LyCORIS's own
modules (the formulas A1111 and ComfyUI apply), weight 0 is the base image exactly, the kohya file converts to
sdtune's layout and back bit-exact, `inspect` names the algorithm, and settings that do not go together are
refused in one line before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lycoris_oracle import from_file
from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.formats.lycoris import KOHYA_PARAMS, param_of

PROMPT = "a sks dog"
# id -> (family, train flags); rank 4 with alpha 2 everywhere, so a scale other than 1 shows where it applies.
CASES = {
    "sd1-loha": ("sd1", ["--algo", "loha"]),
    "sd1-lokr-full-factors": ("sd1", ["--algo", "lokr"]),  # factor -1 at rank 4: no factor split, scale 1
    "sd1-lokr-split": ("sd1", ["--algo", "lokr", "--lokr-factor", "4", "--lokr-decompose-both"]),
    "sd1-dora": ("sd1", ["--dora"]),
    "sdxl-loha": ("sdxl", ["--algo", "loha"]),
    "sdxl-lokr": ("sdxl", ["--algo", "lokr", "--lokr-factor", "4"]),
    "sdxl-dora": ("sdxl", ["--dora"]),
}
ALGORITHM_NAMES = {"loha": "LoHa", "lokr": "LoKr"}


def _train(model_dir, images, out, flags) -> tuple:
    assert main(["train", "lora", "--model", str(model_dir), "--images", str(images), "--token", "sks",
                 "--class-word", "dog", "--steps", "4", "--lr", "3e-2", "--output", str(out), "--rank", "4",
                 "--alpha", "2", "--lora-targets", "attn,conv", "--train-text-encoder", "--quiet", "--log-dir",
                 "none", *flags]) == 0
    return out / "sks.safetensors"


def _ours(model_dir, folder, out, weight="1") -> np.ndarray:
    assert main(["generate", "--model", str(model_dir), "--prompt", f"{PROMPT} <lora:sks:{weight}>", "--artifacts",
                 str(folder), "--steps", "5", "--seed", "3", "--output", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32) / 255


def _pipeline(model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


def _lycoris_names(canonical: dict[str, torch.Tensor], encoders: int) -> dict[str, torch.Tensor]:
    """sdtune's layout under the kohya names LyCORIS gives a diffusers UNet and CLIP (`text_model.` kept), which
    its loader matches against the live modules (for SDXL, whose kohya files use the original model's names)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if encoders > 1 else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    out = {}
    for key, value in canonical.items():
        component, _, rest = key.partition(".")
        param = param_of(rest, KOHYA_PARAMS)
        path = rest[: -len(param) - 1]
        path = path if component == "unet" or path.startswith("text_model.") else f"text_model.{path}"
        out[f"{prefixes[component]}{path.replace('.', '_')}.{KOHYA_PARAMS[param]}"] = value
    return out


@pytest.mark.parametrize("case", CASES)
def test_trained_file_gives_the_image_of_lycoris_applying_it(tiny_pipeline_dirs, subject_dir, tmp_path, case):
    family, flags = CASES[case]
    model_dir = tiny_pipeline_dirs[family]
    kohya = _train(model_dir, subject_dir, tmp_path / "kohya", flags)
    tensors, metadata = load_artifact(kohya)
    modules = {k.split(".")[0] for k in tensors}

    # kohya -> sdtune -> kohya changes no bit; LyCORIS reads the SDXL file under diffusers' module names
    canonical = tmp_path / "sdtune" / "sks.safetensors"
    assert main(["convert", str(kohya), str(canonical), "--to", "sdtune", "--model", str(model_dir)]) == 0
    back = tmp_path / "back" / "sks.safetensors"
    assert main(["convert", str(canonical), str(back), "--to", "kohya", "--model", str(model_dir)]) == 0
    again, _ = load_artifact(back)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    pipe = _pipeline(model_dir)
    base = _image(pipe)
    weights = tensors if family == "sd1" else _lycoris_names(load_artifact(canonical)[0], 2)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    assert len(from_file(pipe.unet, encoders, weights).loras) == len(modules), "LyCORIS should build every module"
    theirs = _image(pipe)

    ours = _ours(model_dir, kohya.parent, tmp_path / "ours.png")
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
    assert np.abs(theirs - base).max() > 4 / 255, "training should visibly change the image"
    zero = _ours(model_dir, kohya.parent, tmp_path / "zero.png", weight="0")
    assert np.array_equal(zero, np.asarray(Image.open(_base_png(model_dir, tmp_path)), dtype=np.float32) / 255)
    algo = flags[1] if flags[0] == "--algo" else "lora"
    if algo in ALGORITHM_NAMES:
        assert json.loads(metadata["ss_network_args"])["algo"] == algo


def _base_png(model_dir, tmp_path):
    out = tmp_path / "base.png"
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--steps", "5", "--seed", "3",
                 "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("algo", ALGORITHM_NAMES)
def test_inspect_names_the_trained_algorithm(tiny_pipeline_dirs, subject_dir, tmp_path, capsys, algo):
    path = _train(tiny_pipeline_dirs["sd1"], subject_dir, tmp_path / "out", ["--algo", algo])
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"algorithm:  {ALGORITHM_NAMES[algo]} x" in text and f"lora_algo: {algo}\n" in text, text


REFUSED = {  # flags -> words the one-line refusal must hold
    ("--algo", "loha", "--dora"): ("--dora", "LoHa", "peft"),
    ("--algo", "lokr", "--dropout", "0.1"): ("--dropout", "--rank-dropout"),
    ("--rank-dropout", "0.1"): ("--rank-dropout", "LoRA"),
    ("--algo", "loha", "--format", "diffusers"): ("LoHa", "diffusers", "LoRA and DoRA only", "kohya"),
    ("--algo", "lokr", "--lokr-factor", "0"): ("--lokr-factor", "-1"),
    ("--algo", "loha", "--lokr-factor", "4"): ("--lokr-factor", "lokr", "loha"),
}


@pytest.mark.parametrize("flags", REFUSED, ids=lambda f: "-".join(a.strip("-") for a in f))
def test_settings_that_do_not_go_together_are_refused_before_anything_loads(tmp_path, capsys, flags):
    out = tmp_path / "out"
    code = main(["train", "lora", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path / "no-images"),
                 "--output", str(out), "--steps", "2", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for words in REFUSED[flags]:
        assert words in err, (words, err)
    assert not out.exists(), "nothing is written before the settings are refused"
