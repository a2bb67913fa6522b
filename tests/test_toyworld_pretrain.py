"""The pretraining recipe: a tiny smoke run gives a diffusers pipeline folder, and a resumed run continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdtune.toyworld import ckpt as ck
from sdtune.toyworld.loop import lr_at
from sdtune.toyworld.pretrain import load_config, main

TINY = [
    "n_images=64", "render_chunk=64", "vae.batch_size=4", "unet.batch_size=4", "decoder.batch_size=4",
    "budget.eval_images=0",
    "model.vae_channels=[16,32]", "model.unet_channels=[16,32]", "model.unet_heads=2", "model.text_width=32",
    "model.text_layers=1", "model.text_heads=2", "model.text_ff=64", "budget.log_every=2",
]


def _run(tmp: Path, *extra: str) -> Path:
    args = ["--device", "cpu", "--out", str(tmp / "builtin"), "--ckpt", str(tmp / "ckpt.pt")]
    for item in TINY:
        args += ["--set", item]
    return main(args + list(extra))


def test_smoke_pretrain_writes_a_loadable_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors import safe_open

    out = _run(tmp_path, "--max-steps", "3")
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # plain call, as a user would
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the latents, not left at the default
    assert pipe.tokenizer("a sks circle", add_special_tokens=False).input_ids.__len__() == 3
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    state = ck.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["phase"] == "done"
    assert (tmp_path / "pretrain.log").read_text().count("[unet] step") >= 1


def test_interrupted_run_resumes_to_nearly_the_same_weights(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    _run(full, "--max-steps", "6")
    _run(split, "--max-steps", "6", "--interrupt-after", "3")
    halfway = ck.load_checkpoint(split / "ckpt.pt")
    assert halfway["phase"] == "unet" and halfway["step"] == 3
    _run(split, "--max-steps", "6", "--resume")
    log = (split / "pretrain.log").read_text()
    assert "training from step 3" in log
    # The resumed run took its latents from the cache the first run left, instead of rendering again.
    assert log.count("[data] rendered") == 1 and f"from {split / 'ckpt_latents.pt'}" in log
    a, b = ck.load_checkpoint(full / "ckpt.pt"), ck.load_checkpoint(split / "ckpt.pt")
    assert a["phase"] == b["phase"] == "done"
    dist = lambda x, y: sum((x[k].float() - y[k].float()).abs().sum() for k in x)  # noqa: E731
    # The resumed run ends far closer to the uninterrupted one than the halfway point is: only fp16 weights
    # and 8-bit Adam moments separate them.
    assert dist(a["unet"], b["unet"]) < 0.1 * dist(a["unet"], halfway["unet"])


def test_optimizer_state_round_trips_through_8_bit_packing():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn(1000) * torch.logspace(-6, 0, 1000)
        opt.step()
    packed = ck.pack_optimizer(opt)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    ck.unpack_optimizer(opt2, packed)
    s1, s2 = opt.state[p], opt2.state[opt2.param_groups[0]["params"][0]]
    rel_v = ((s2["exp_avg_sq"] - s1["exp_avg_sq"]).abs() / s1["exp_avg_sq"]).max()
    assert rel_v < 0.1  # log-scaled: relative error bounded even across six decades
    assert (s2["exp_avg"] - s1["exp_avg"]).abs().max() <= s1["exp_avg"].abs().max() / 127


def test_config_overrides_and_schedule():
    cfg = load_config(None, ["unet.lr=0.5", "model.unet_channels=[8,16]"])
    assert cfg["unet"]["lr"] == 0.5 and cfg["model"]["unet_channels"] == [8, 16]
    assert cfg["captions"]["p_empty"] >= 0.1  # classifier-free guidance needs unconditional examples
    with pytest.raises(Exception, match="Unknown config key"):
        load_config(None, ["unet.nonsense=1"])
    assert lr_at(0, 1000, 1.0, 100, 0.1) == pytest.approx(0.01)
    assert lr_at(1000, 1000, 1.0, 100, 0.1) == pytest.approx(0.1)
    assert json.loads(json.dumps(cfg)) == cfg  # stored inside checkpoints as JSON


def test_decoder_tune_changes_only_the_decoder_of_a_pipeline_folder(tmp_path, monkeypatch):
    import time

    from diffusers import AutoencoderKL

    from sdtune.toyworld import decoder_tune

    out = _run(tmp_path, "--max-steps", "2")
    # As if a long test suite ran for an hour after the module was imported: the budget must count from the call.
    real_clock = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_clock() + 3600)
    before = AutoencoderKL.from_pretrained(str(out / "vae")).state_dict()
    args = ["--pipeline", str(out), "--device", "cpu", "--max-steps", "3", "--ckpt", str(tmp_path / "dec.pt")]
    for item in TINY:
        args += ["--set", item]
    report = decoder_tune.main(args)
    assert 0.0 <= report["subject_detected"] <= 1.0 and "plain_background" in report
    after = AutoencoderKL.from_pretrained(str(out / "vae")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_latent_cache_is_used_only_for_the_same_recipe_and_vae(tmp_path):
    from sdtune.toyworld import trainset as ts

    data = ts.TrainSet(None, {"shape": torch.arange(3)}, torch.zeros(2, 77, dtype=torch.long), torch.ones(3, 4, 2, 2))
    vae = {"w": torch.ones(2, dtype=torch.float16)}
    key = ts.latents_key({"seed": 0}, vae)
    ts.save_latents(tmp_path / "c.pt", data, key, 0.5)
    loaded, scale = ts.load_latents(tmp_path / "c.pt", key, torch.device("cpu"))
    assert scale == 0.5 and len(loaded) == 3 and torch.equal(loaded.latents, data.latents)
    assert ts.load_latents(tmp_path / "c.pt", ts.latents_key({"seed": 1}, vae), torch.device("cpu")) is None
    other_vae = {"w": torch.zeros(2, dtype=torch.float16)}
    assert ts.load_latents(tmp_path / "c.pt", ts.latents_key({"seed": 0}, other_vae), torch.device("cpu")) is None
    assert ts.load_latents(tmp_path / "missing.pt", key, torch.device("cpu")) is None
