"""LoRA end to end: train with the CLI, generate, and match diffusers' own LoRA loader image for image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.cli import main
from sdtune.config import DataConfig, TrainConfig
from sdtune.methods.lora import LoRA, LoRAConfig
from sdtune.model import load
from sdtune.train import train

FAMILIES = ["sd1", "sd2"]
GROUP_MARKERS = {"attn": "to_k", "ff": "ff_net_2", "conv": "conv2", "time": "time_emb_proj", "io": "conv_out",
                 "resample": "upsamplers_0_conv"}


def _train_cli(model_dir, images, out, fmt, steps=4, extra=()):
    argv = ["train", "lora", "--model", str(model_dir), "--images", str(images), "--token", "sks",
            "--class-word", "dog", "--steps", str(steps), "--lr", "3e-2", "--output", str(out),
            "--format", fmt, "--rank", "4", "--alpha", "2", "--quiet", "--log-dir", "none", *extra]
    assert main(argv) == 0
    return out / "sks.safetensors"


def _sdtune_image(model_dir, prompt, artifacts, out_png):
    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--artifacts", str(artifacts),
                 "--steps", "5", "--seed", "3", "--output", str(out_png)]) == 0
    from PIL import Image

    return np.asarray(Image.open(out_png), dtype=np.float32) / 255


def _diffusers_image(model_dir, lora_file, prompt):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    image = pipe(prompt, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
# attn,conv: kohya's LoCon layout; the last: every UNet group sdtune names, as the compare recipe uses most of them
@pytest.mark.parametrize("targets", ["attn", "attn,conv", "attn,ff,conv,time,io,resample"])
def test_trained_lora_matches_diffusers_loader(tiny_pipeline_dirs, subject_dir, tmp_path, family, fmt, targets):
    model_dir = tiny_pipeline_dirs[family]
    lora = _train_cli(model_dir, subject_dir, tmp_path / "out", fmt, extra=("--lora-targets", targets))
    assert lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = [k.replace(".", "_") for k in f.keys()]  # one spelling for the kohya and diffusers layouts
    for group in targets.split(","):
        marker = GROUP_MARKERS[group]
        assert any(marker in k for k in keys), f"no LoRA weights for the {group} layers ({marker})"
    ours = _sdtune_image(model_dir, "a sks dog <lora:sks:1>", lora.parent, tmp_path / "ours.png")
    theirs = _diffusers_image(model_dir, lora, "a sks dog")
    base = _diffusers_image(model_dir, None, "a sks dog")
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - base).max() > 4 / 255, "the LoRA should visibly change the image"


def test_weight_zero_gives_the_base_image(tiny_pipeline_dirs, subject_dir, tmp_path):
    model_dir = tiny_pipeline_dirs["sd1"]
    lora = _train_cli(model_dir, subject_dir, tmp_path / "out", "kohya")
    zero = _sdtune_image(model_dir, "a sks dog <lora:sks:0>", lora.parent, tmp_path / "zero.png")
    base = _sdtune_image(model_dir, "a sks dog", lora.parent, tmp_path / "base.png")
    half = _sdtune_image(model_dir, "a sks dog <lora:sks:0.5>", lora.parent, tmp_path / "half.png")
    assert np.array_equal(zero, base)
    assert not np.array_equal(half, base)


def _base_tensors(model):
    """Every non-LoRA tensor, under its original name (peft moves wrapped weights to .base_layer)."""
    tensors = {}
    for component, module in model.components().items():
        for key, value in module.state_dict().items():
            if "lora_" not in key:
                tensors[f"{component}.{key.replace('.base_layer', '')}"] = value.clone()
    return tensors


def _fixed_batch_loss(model, method_cfg, data_cfg):
    """Loss on one fixed batch (fixed noise and timesteps) with the weights as they are."""
    from accelerate import Accelerator

    from sdtune.loss import draw_noise, per_sample_mse, training_target
    from sdtune.trainset import build_training_set

    cfg = TrainConfig(steps=1, seed=11)
    examples = build_training_set(model, data_cfg, cfg, Accelerator(cpu=True))
    batch = examples.batch([0, 1, 2, 3])
    scheduler = model.noise_scheduler()
    noise, t = draw_noise(tuple(batch.latents.shape[1:]), [100, 101, 102, 103], 5, 1000)
    with torch.no_grad():
        noisy = scheduler.add_noise(batch.latents, noise, t)
        pred = model.unet(noisy, t, batch.conditioning.hidden_states).sample
    return float(per_sample_mse(pred, training_target(scheduler, batch.latents, noise, t)).mean())


def test_training_moves_only_lora_weights_and_lowers_the_loss(subject_dir, tmp_path):
    model = load("tiny:sd1")
    before = _base_tensors(model)
    data_cfg = DataConfig(images=str(subject_dir), token="sks", class_word="dog")
    method_cfg = LoRAConfig(rank=8, train_text_encoder=True)
    method = LoRA(method_cfg)
    method.setup(model)
    loss_before = _fixed_batch_loss(model, method_cfg, data_cfg)
    model2 = load("tiny:sd1")
    result = train(model2, LoRA(method_cfg),
                   TrainConfig(steps=30, lr=2e-2, batch_size=4, log_dir="none"), data_cfg, tmp_path, "sks",
                   progress=False)
    after = _base_tensors(model2)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    loss_after = _fixed_batch_loss(model2, method_cfg, data_cfg)
    assert loss_after < loss_before * 0.9, (loss_before, loss_after)
    assert result.trainable_params > 0 and result.paths[0].is_file()


# id -> LoRA settings; each with its randomness (dropout draws) and, for LoKr, factors split and full alike.
RESUMED = {
    "lora": dict(dropout=0.1),
    "dora": dict(dropout=0.1, dora=True),
    "loha": dict(algo="loha", rank_dropout=0.1, module_dropout=0.1, loraplus_ratio=4.0),
    "lokr": dict(algo="lokr", lokr_factor=4, rank_dropout=0.1, module_dropout=0.1, train_text_encoder=True),
}


@pytest.mark.parametrize("case", RESUMED)
def test_resume_continues_exactly(subject_dir, tmp_path, case):
    from sdtune.artifacts import load_artifact

    common = dict(steps=6, lr=1e-2, batch_size=2, lr_scheduler="cosine", log_dir="none")
    data_cfg = DataConfig(images=str(subject_dir), token="sks", class_word="dog", flip=True, center_crop=False)
    cfg = LoRAConfig(rank=4, format="sdtune", targets="attn,conv", **RESUMED[case])
    dora = cfg.dora
    full = tmp_path / "full"
    train(load("tiny:sd1"), LoRA(cfg), TrainConfig(checkpoint_every=3, **common), data_cfg, full, "a",
          progress=False)
    checkpoint = full / "checkpoints" / "step-000003"
    assert checkpoint.is_dir()
    resumed = tmp_path / "resumed"
    train(load("tiny:sd1"), LoRA(cfg), TrainConfig(resume=str(checkpoint), **common), data_cfg, resumed,
          "a", progress=False)
    a, _ = load_artifact(full / "a.safetensors")
    b, _ = load_artifact(resumed / "a.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".dora_scale") for k in a) == dora
    prefix = {"lora": ".lora_A.", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}[cfg.algo]
    assert any(prefix in k for k in a), "the file holds another algorithm's parameters"
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _largest_b_after_one_step(subject_dir, out, **lora) -> dict[str, float]:
    """Per component, the largest LoRA B entry after one step at lr 1e-3. B starts at zero and Adam's first
    step moves every element with a gradient by about its learning rate: this reads the lr B was given."""
    from sdtune.artifacts import load_artifact

    cfg = LoRAConfig(rank=4, format="sdtune", **lora)
    train(load("tiny:sd1"), LoRA(cfg), TrainConfig(steps=1, lr=1e-3, batch_size=2, log_dir="none"),
          DataConfig(images=str(subject_dir), token="sks", class_word="dog"), out, "a", progress=False)
    state, _ = load_artifact(out / "a.safetensors")
    largest: dict[str, float] = {}
    for key, value in state.items():
        if key.endswith("lora_B.weight"):
            component = key.split(".")[0]
            largest[component] = max(largest.get(component, 0.0), float(value.abs().max()))
    return largest


def test_loraplus_ratio_gives_the_b_matrices_a_larger_step(subject_dir, tmp_path):
    assert _largest_b_after_one_step(subject_dir, tmp_path / "plain") == {"unet": pytest.approx(1e-3, rel=0.02)}
    plus = _largest_b_after_one_step(subject_dir, tmp_path / "plus", loraplus_ratio=16.0)
    assert plus == {"unet": pytest.approx(16e-3, rel=0.02)}


def test_text_encoder_lr_applies_to_the_text_encoder_lora_only(subject_dir, tmp_path):
    steps = _largest_b_after_one_step(subject_dir, tmp_path / "te", train_text_encoder=True, text_encoder_lr=2e-4,
                                      loraplus_ratio=4.0)
    assert steps == {"unet": pytest.approx(4e-3, rel=0.02), "text_encoder": pytest.approx(8e-4, rel=0.02)}
