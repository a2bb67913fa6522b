"""The shared loop: batch-split invariance, loop options, validation images and logs."""

from __future__ import annotations

import pytest
import torch

from sdtune.config import DataConfig, TrainConfig
from sdtune.loss import draw_noise
from sdtune.methods.lora import LoRA, LoRAConfig
from sdtune.model import load
from sdtune.train import train


def _lora_run(out, subject_dir, **train_options):
    cfg = LoRAConfig(rank=4, format="sdtune")
    data = DataConfig(images=str(subject_dir), token="sks", class_word="dog")
    options = dict(steps=3, lr=1e-2, log_dir="none", seed=4)
    options.update(train_options)
    result = train(load("tiny:sd1"), LoRA(cfg), TrainConfig(**options), data, out, "a", progress=False)
    from sdtune.artifacts import load_artifact

    return load_artifact(result.paths[0])[0], result


def test_noise_depends_only_on_seed_and_position():
    a, ta = draw_noise((4, 8, 8), [5, 6, 7], seed=1, num_timesteps=1000)
    b, tb = draw_noise((4, 8, 8), [6], seed=1, num_timesteps=1000)
    assert torch.equal(a[1], b[0]) and ta[1] == tb[0]
    c, _ = draw_noise((4, 8, 8), [6], seed=2, num_timesteps=1000)
    assert not torch.equal(b, c)


def test_timesteps_stay_in_the_range_asked_for():
    positions = list(range(400))
    _, everywhere = draw_noise((4, 8, 8), positions, seed=1, num_timesteps=1000)
    _, high = draw_noise((4, 8, 8), positions, seed=1, num_timesteps=1000, timestep_range=(700, 1000))
    assert everywhere.min() < 100 and everywhere.max() > 900
    assert high.min() >= 700 and 990 <= high.max() <= 999 and len(set(high.tolist())) > 100


def test_splitting_the_batch_gives_the_same_weights(tmp_path, subject_dir):
    whole, whole_run = _lora_run(tmp_path / "whole", subject_dir, batch_size=4, grad_accum=1)
    split, split_run = _lora_run(tmp_path / "split", subject_dir, batch_size=2, grad_accum=2)
    single, single_run = _lora_run(tmp_path / "single", subject_dir, batch_size=1, grad_accum=4)
    # The same samples with the same noise: the losses agree to float precision.
    torch.testing.assert_close(torch.tensor(split_run.losses), torch.tensor(whole_run.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(single_run.losses), torch.tensor(whole_run.losses), rtol=1e-5, atol=0)
    # Float sums in another order differ in the last bits, which Adam's normalisation magnifies for
    # near-zero gradients (up to ~lr per step), so weights are compared 25x below how far they moved.
    moved = max(whole[k].abs().max().item() for k in whole if k.endswith("lora_B.weight"))
    assert moved > 5e-3, "training moved nothing"
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(whole[key], single[key], rtol=1e-3, atol=2e-4)


def test_loop_options_run_and_write_validation_images_and_logs(tmp_path, subject_dir):
    out = tmp_path / "run"
    _, result = _lora_run(out, subject_dir, steps=2, batch_size=2, mixed_precision="bf16",
                          gradient_checkpointing=True, min_snr_gamma=5.0, offset_noise=0.05,
                          lr_scheduler="cosine", warmup_steps=1, validation_every=2, log_dir="",
                          checkpoint_every=1, keep_checkpoints=1)
    assert (out / "validation" / "step-000002.png").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000001"]
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)
    assert result.peak_memory > 0


def test_v_prediction_model_trains(tmp_path, subject_dir):
    cfg = LoRAConfig(rank=2, format="sdtune")
    model = load("tiny:sd2")
    assert model.noise_scheduler().config.prediction_type == "v_prediction"
    result = train(model, LoRA(cfg), TrainConfig(steps=2, log_dir="none"),
                   DataConfig(images=str(subject_dir), token="sks", class_word="dog"), tmp_path, "v", progress=False)
    assert result.paths[0].is_file()


def test_diverging_training_stops_with_a_clear_error(tmp_path, subject_dir, monkeypatch):
    from sdtune import train as train_module
    from sdtune.errors import SdtuneError

    real = train_module.per_sample_mse
    monkeypatch.setattr(train_module, "per_sample_mse", lambda p, t: real(p, t) * float("nan"))
    with pytest.raises(SdtuneError, match="diverged at step 1"):
        _lora_run(tmp_path / "nan", subject_dir)
    assert not (tmp_path / "nan" / "a.safetensors").exists()
