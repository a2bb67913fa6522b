"""DreamBooth on the shared loop: prior preservation, what trains and what stays frozen, EMA, token checks."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from conftest import make_subject_images
from sdtune.config import DataConfig, TrainConfig
from sdtune.methods.dreambooth import DreamBooth, DreamBoothConfig, token_problem
from sdtune.model import load
from sdtune.optimization import make_optimizer
from sdtune.train import _micro_batch_loss, train
from sdtune.trainset import build_training_set
from sdtune.unet_runner import UNetRunner


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _class_dir(tmp_path, count):
    """Class images unlike the subject (no yellow square), so their loss term differs."""
    from PIL import Image

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(folder / f"own_{i}.png")
    return folder


def test_prior_preservation_loss_sums_instance_and_weighted_class_terms(subject_dir, tmp_path):
    from sdtune.loss import draw_noise, per_sample_mse, training_target

    model = load("tiny:sd1")
    data = DataConfig(images=str(subject_dir), token="sks", class_word="dog",
                      class_images=str(_class_dir(tmp_path, 3)))
    accelerator = Accelerator(cpu=True)
    examples = build_training_set(model, data, TrainConfig(prior_preservation=True, batch_size=2), accelerator)
    batch = examples.batch([0, 1])
    assert batch.is_class.tolist() == [False, False, True, True]
    from sdtune.conditioning import encode

    expected = encode(model, ["a photo of sks dog"] * 2 + ["a photo of a dog"] * 2).hidden_states
    assert torch.equal(batch.conditioning.hidden_states, expected)

    # The per-sample losses, computed independently of the loop's combination.
    scheduler = model.noise_scheduler()
    noise, t = draw_noise(tuple(batch.latents.shape[1:]), batch.noise_positions, 0, 1000)
    with torch.no_grad():
        pred = model.unet(scheduler.add_noise(batch.latents, noise, t), t, batch.conditioning.hidden_states).sample
    per_sample = per_sample_mse(pred, training_target(scheduler, batch.latents, noise, t))
    instance, prior = per_sample[:2].mean().item(), per_sample[2:].mean().item()
    assert abs(instance - prior) > 1e-3
    unet = UNetRunner(model.unet, "off", [])  # the loop's eager UNet call
    for weight in (0.0, 1.0, 2.5):
        cfg = TrainConfig(prior_preservation=True, prior_loss_weight=weight, batch_size=2)
        with torch.no_grad():
            loss = _micro_batch_loss(unet, examples, [0, 1], scheduler, cfg, 2, accelerator).item()
        assert loss == pytest.approx(instance + weight * prior, rel=1e-5)
    without = TrainConfig(prior_preservation=False, batch_size=2)
    with torch.no_grad():
        assert _micro_batch_loss(unet, examples, [0, 1], scheduler, without, 2, accelerator).item() == \
            pytest.approx(instance, rel=1e-5)


@pytest.fixture(scope="module")
def frozen_text_run(tmp_path_factory):
    """One DreamBooth run with prior preservation (the class folder is one image short, so the loop
    generates one), the text encoder frozen, and a checkpoint after every step."""
    root = tmp_path_factory.mktemp("db")
    subject = make_subject_images(root / "subject")
    class_dir = _class_dir(root, 1)
    model = load("tiny:sd1")
    before = {name: _state(module) for name, module in model.components().items()}
    cfg = DreamBoothConfig()
    data = DataConfig(images=str(subject), token="sks", class_word="dog", class_images=str(class_dir),
                      num_class_images=2, class_image_steps=2)
    result = train(model, DreamBooth(cfg),
                   TrainConfig(steps=3, lr=1e-3, batch_size=2, prior_preservation=True, checkpoint_every=1,
                               keep_checkpoints=3, log_dir="none", seed=5), data, root / "out", "sks", progress=False)
    return dict(root=root, model=model, before=before, result=result, data=data, class_dir=class_dir)


def test_frozen_text_encoder_is_bit_identical_and_the_unet_trains(frozen_text_run):
    model, before = frozen_text_run["model"], frozen_text_run["before"]
    for name in ("text_encoder", "vae"):
        after = model.components()[name].state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{name} changed"
    unet = model.unet.state_dict()
    changed = [k for k in unet if not torch.equal(before["unet"][k], unet[k])]
    assert len(changed) > 0.9 * len(unet)
    assert frozen_text_run["result"].trainable_params == sum(p.numel() for p in model.unet.parameters())
    # The short class folder was topped up with a generated image, recorded in the manifest.
    class_dir = frozen_text_run["class_dir"]
    assert len(list(class_dir.glob("*.png"))) == 2 and (class_dir / "sdtune-class-images.json").is_file()


def test_ema_saves_the_moving_average_of_the_steps(frozen_text_run, tmp_path):
    from sdtune.artifacts import load_artifact

    checkpoints = frozen_text_run["root"] / "out" / "checkpoints"
    steps = [load_artifact(checkpoints / f"step-00000{i}" / "trainable.safetensors")[0] for i in (1, 2)]
    steps.append({f"unet.{k}": v for k, v in frozen_text_run["model"].unet.state_dict().items()})
    decay = 0.5
    model = load("tiny:sd1")
    cfg = DreamBoothConfig()
    train(model, DreamBooth(cfg), TrainConfig(steps=3, lr=1e-3, batch_size=2, prior_preservation=True,
                                                   log_dir="none", seed=5, ema_decay=decay),
          frozen_text_run["data"], tmp_path, "ema", progress=False)
    # diffusers' EMAModel: decay 0 at the first step, then min(decay, (1 + n) / (10 + n)) for step n + 1.
    weights = [0.0] + [min(decay, (1 + n) / (10 + n)) for n in (1, 2)]
    ema = model.unet.state_dict()
    for key, value in ema.items():
        expected = steps[0][f"unet.{key}"]
        for step, d in zip(steps[1:], weights[1:]):
            expected = d * expected + (1 - d) * step[f"unet.{key}"]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ema["conv_out.weight"], steps[-1]["unet.conv_out.weight"])


def test_text_encoder_trains_with_its_own_lr_and_stops_after_its_steps(subject_dir, tmp_path):
    from sdtune.artifacts import load_artifact

    model = load("tiny:sd1")
    base_text = _state(model.text_encoder)
    cfg = DreamBoothConfig(train_text_encoder=True, text_encoder_lr=5e-3, train_text_encoder_steps=1)
    train(model, DreamBooth(cfg), TrainConfig(steps=3, lr=1e-3, checkpoint_every=1, keep_checkpoints=3,
                                                   log_dir="none"),
          DataConfig(images=str(subject_dir), token="sks", class_word="dog"), tmp_path, "te", progress=False)
    first, _ = load_artifact(tmp_path / "checkpoints" / "step-000001" / "trainable.safetensors")
    final = model.text_encoder.state_dict()
    assert any(not torch.equal(base_text[k], final[k]) for k in final), "the text encoder never trained"
    for key, value in final.items():  # frozen after step 1: identical ever since
        assert torch.equal(first[f"text_encoder.{key}"], value), key
    assert not torch.equal(first["unet.conv_out.weight"], model.unet.state_dict()["conv_out.weight"])


def test_group_learning_rates_scale_with_the_base_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer, _ = make_optimizer([{"params": [a]}, {"params": [b], "lr": 1e-3}], 4,
                                   TrainConfig(lr=1e-4, steps=2), torch.device("cpu"))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([4e-4, 4e-3])


def test_token_checks_flag_split_common_and_class_words(tmp_path):
    from transformers import CLIPTokenizer

    from sdtune.tokenizer_build import write_clip_tokenizer

    words = ["a", "photo", "of", "dog", "cat", "toy", "house", "tree", "car", "person", "sks"]
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, words))
    assert "split into" in token_problem(tokenizer, "zqxjk")
    assert "common word" in token_problem(tokenizer, "dog")
    assert "class word" in token_problem(tokenizer, "tree", "tree")
    assert token_problem(tokenizer, "sks", "dog") is None  # last in the merge order: rare
    assert token_problem(tokenizer, "dog", "cat", {"rare_tokens": ["dog"]}) is None


def test_check_data_warns_through_logging(caplog):
    model = load("tiny:sd1")
    with caplog.at_level("WARNING"):
        DreamBooth().check_data(model, DataConfig(token="zqxjk", class_word="dog"))
    assert "split into" in caplog.text
