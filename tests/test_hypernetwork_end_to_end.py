"""Hypernetworks end to end on tiny models: weight 0 is the base image, stacking equals a hand-computed chain,
LoRA still applies under the processor, training lowers the loss and touches nothing but the hypernetwork."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypernetwork_reference import ReferenceAttention, build_file
from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.config import DataConfig, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.formats.hypernetwork import read
from sdtune.methods.hypernetwork import Hypernetwork, HypernetworkConfig, write_file
from sdtune.model import load
from sdtune.train import train

WIDTHS = [32, 64]  # tiny:sd1: self-attention at 32 and 64, text context 32
SPEC_A = [("linear", (1, 2)), ("act", "relu"), ("norm", None), ("linear", (2, 1)), ("norm", None)]
ENTRIES_A = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
             "activate_output": False, "dropout_structure": [0, 0, 0]}
SPEC_B = [("linear", (1, 1)), ("act", "tanh"), ("linear", (1, 1)), ("act", "tanh")]
ENTRIES_B = {"layer_structure": [1, 1, 1], "activation_func": "tanh"}  # activate_output missing: True


@pytest.fixture
def two_files(tmp_path):
    """a.pt (A1111 layout, hand-built) and b.safetensors (sdtune form of a hand-built file), with their states."""
    folder = tmp_path / "hn"
    folder.mkdir()
    states_a = build_file(folder / "a.pt", WIDTHS, ENTRIES_A, SPEC_A, seed=1)
    states_b = build_file(tmp_path / "b.pt", WIDTHS, ENTRIES_B, SPEC_B, seed=2)
    write_file(_decode(tmp_path / "b.pt"), folder / "b.safetensors", "sdtune")
    return folder, states_a, states_b


def _decode(path):
    obj, metadata = load_artifact(path)
    return read(obj, metadata, path.name)


def _unet_out(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500, 20]), context).sample


def _with(files: list[tuple], spec: str = "tiny:sd1"):
    model = load(spec)
    for path, weight in files:
        Hypernetwork().apply(model, _decode(path), weight, name=path.stem)
    return model


def _image(folder, prompt, out):
    from PIL import Image

    assert main(["generate", "--model", "tiny:sd1", "--prompt", prompt, "--artifacts", str(folder),
                 "--steps", "4", "--seed", "3", "--output", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32)


def test_weight_zero_gives_the_base_image_one_differs_and_textual_inversion_composes(two_files, tmp_path):
    from sdtune.artifacts import save_artifact

    folder, _, _ = two_files
    base = _image(folder, "a zq square", tmp_path / "base.png")
    assert np.array_equal(_image(folder, "a zq square <hypernet:a:0>", tmp_path / "zero.png"), base)
    one = _image(folder, "a zq square <hypernet:a>", tmp_path / "one.png")
    assert np.abs(one - base).max() > 4
    save_artifact(folder / "zq.safetensors", {"emb_params": torch.randn(2, 32, generator=torch.Generator())})
    embedding = _image(folder, "a zq square", tmp_path / "ti.png")
    both = _image(folder, "a zq square <hypernet:a>", tmp_path / "both.png")
    assert not np.array_equal(embedding, base)
    assert not np.array_equal(both, embedding) and not np.array_equal(both, one)


def test_stacking_equals_the_hand_computed_chain_in_order(two_files):
    folder, states_a, states_b = two_files
    a, b = folder / "a.pt", folder / "b.safetensors"
    stacked = _unet_out(_with([(a, 1.0), (b, 0.5)]))
    reference = load("tiny:sd1")
    reference.unet.set_attn_processor(ReferenceAttention([(SPEC_A, states_a, 1.0), (SPEC_B, states_b, 0.5)]))
    torch.testing.assert_close(stacked, _unet_out(reference), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stacked, _unet_out(_with([(b, 0.5), (a, 1.0)])), atol=1e-4)  # order matters
    base = _unet_out(load("tiny:sd1"))
    assert torch.equal(_unet_out(_with([(a, 0.0), (b, 0.0)])), base)
    assert torch.equal(_unet_out(_with([(b, 0.0), (a, 1.0)])), _unet_out(_with([(a, 1.0)])))
    cleared = _with([(a, 1.0)])
    cleared.extras["hypernetworks"].clear()
    assert torch.equal(_unet_out(cleared), base)


def _random_lora_state() -> dict:
    from sdtune.methods.lora import LoRA, LoRAConfig

    model = load("tiny:sd1")
    method = LoRA(LoRAConfig(rank=4))
    torch.manual_seed(5)
    with torch.no_grad():
        for group in method.setup(model):
            for param in group["params"]:
                param.normal_(0, 0.3)
    return method.state_dict(model)


def test_lora_still_applies_under_the_hypernetwork_processor(two_files):
    from sdtune.methods.lora import LoRA

    folder, states_a, _ = two_files
    lora = _random_lora_state()
    hn_then_lora = _with([(folder / "a.pt", 0.8)])
    LoRA().apply(hn_then_lora, lora, 1.0, name="l")
    lora_then_hn = load("tiny:sd1")
    LoRA().apply(lora_then_hn, lora, 1.0, name="l")
    Hypernetwork().apply(lora_then_hn, _decode(folder / "a.pt"), 0.8, name="a")
    reference = load("tiny:sd1")
    LoRA().apply(reference, lora, 1.0, name="l")
    lora_only = _unet_out(reference)
    reference.unet.set_attn_processor(ReferenceAttention([(SPEC_A, states_a, 0.8)]))
    out = _unet_out(hn_then_lora)
    torch.testing.assert_close(out, _unet_out(reference), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, _unet_out(lora_then_hn), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, lora_only, atol=1e-4)
    assert not torch.allclose(out, _unet_out(_with([(folder / "a.pt", 0.8)])), atol=1e-4)


def _base_tensors(model) -> dict:
    return {f"{c}.{k}": v.clone() for c, m in model.components().items() for k, v in m.state_dict().items()}


def _fixed_batch_loss(model, data_cfg) -> float:
    from accelerate import Accelerator

    from sdtune.loss import draw_noise, per_sample_mse, training_target
    from sdtune.trainset import build_training_set

    examples = build_training_set(model, data_cfg, TrainConfig(steps=1, seed=11), Accelerator(cpu=True))
    batch = examples.batch([0, 1, 2, 3])
    scheduler = model.noise_scheduler()
    noise, t = draw_noise(tuple(batch.latents.shape[1:]), [100, 101, 102, 103], 5, 1000)
    with torch.no_grad():
        noisy = scheduler.add_noise(batch.latents, noise, t)
        pred = model.unet(noisy, t, batch.conditioning.hidden_states).sample
    return float(per_sample_mse(pred, training_target(scheduler, batch.latents, noise, t)).mean())


def test_training_lowers_the_loss_and_moves_only_hypernetwork_weights(subject_dir, tmp_path):
    data_cfg = DataConfig(images=str(subject_dir), token="sks", class_word="dog")
    cfg = HypernetworkConfig()
    fresh = load("tiny:sd1")
    Hypernetwork(cfg).setup(fresh)
    loss_before = _fixed_batch_loss(fresh, data_cfg)
    model = load("tiny:sd1")
    before = _base_tensors(model)
    result = train(model, Hypernetwork(cfg), TrainConfig(steps=20, lr=2e-2, batch_size=4, log_dir="none"),
                   data_cfg, tmp_path, "sks", progress=False)
    after = _base_tensors(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    loss_after = _fixed_batch_loss(model, data_cfg)
    assert loss_after < loss_before * 0.95, (loss_before, loss_after)
    assert result.paths == [tmp_path / "sks.safetensors"]
    hf = _decode(result.paths[0])
    assert hf.widths == WIDTHS and hf.entries["step"] == 20 and hf.entries["name"] == "sks"
    per_module = {w: w * 2 * w + 2 * w + 2 * w * w + w for w in WIDTHS}  # Linear(w, 2w) + Linear(2w, w)
    assert result.trainable_params == hf.param_count == 2 * sum(per_module.values())


def test_cli_trains_an_a1111_file_that_generates(subject_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "hypernetwork", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks",
                 "--class-word", "dog", "--steps", "2", "--lr", "5e-2", "--batch-size", "2", "--output", str(out),
                 "--format", "a1111", "--layer-structure", "1,1.5,1", "--activation", "swish", "--layer-norm",
                 "--dropout", "0.1", "--weight-init", "XavierNormal", "--sizes", "32", "--quiet",
                 "--log-dir", "none"]) == 0
    raw = torch.load(out / "sks.pt", weights_only=True)
    assert [k for k in raw if isinstance(k, int)] == [32]
    assert raw["layer_structure"] == [1, 1.5, 1] and raw["activation_func"] == "swish"
    assert raw["is_layer_norm"] is True and raw["dropout_structure"] == [0, 0.1, 0] and raw["step"] == 2
    assert list(raw[32][0]) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                                "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias"]
    base = _image(out, "a sks dog", tmp_path / "base.png")
    assert np.abs(_image(out, "a sks dog <hypernet:sks:1>", tmp_path / "hn.png") - base).max() > 0
    with pytest.raises(SdtuneError, match="matches no attention layer"):
        Hypernetwork(HypernetworkConfig(sizes="768")).setup(load("tiny:sd1"))


def test_resume_continues_exactly(subject_dir, tmp_path):
    common = dict(steps=4, lr=1e-2, batch_size=2, log_dir="none")
    data_cfg = DataConfig(images=str(subject_dir), token="sks", class_word="dog")
    cfg = HypernetworkConfig(activation="relu", dropout="0.2")
    train(load("tiny:sd1"), Hypernetwork(cfg), TrainConfig(checkpoint_every=2, **common), data_cfg,
          tmp_path / "full", "a", progress=False)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000002"
    train(load("tiny:sd1"), Hypernetwork(cfg), TrainConfig(resume=str(checkpoint), **common), data_cfg,
          tmp_path / "resumed", "a", progress=False)
    a, b = _decode(tmp_path / "full" / "a.safetensors"), _decode(tmp_path / "resumed" / "a.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_sdxl_trains_and_applies_at_its_context_width(subject_dir, tmp_path):
    data_cfg = DataConfig(images=str(subject_dir), token="sks", class_word="dog")
    cfg = HypernetworkConfig(weight_init="XavierUniform")
    model = load("tiny:sdxl")
    result = train(model, Hypernetwork(cfg), TrainConfig(steps=2, lr=1e-2, batch_size=2, log_dir="none"),
                   data_cfg, tmp_path, "xl", progress=False)
    hf = _decode(result.paths[0])
    assert hf.widths == [64]  # tiny:sdxl: text context 64 (2048 at full size), self-attention 64
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}

    def out(weight):
        m = load("tiny:sdxl")
        if weight is not None:
            Hypernetwork().apply(m, hf, weight, name="xl")
        with torch.no_grad():
            return m.unet(x, torch.tensor([300]), context, added_cond_kwargs=added).sample

    base = out(None)
    assert torch.equal(out(0.0), base) and not torch.allclose(out(1.0), base, atol=1e-5)
    with pytest.raises(SdtuneError, match="another model family"):
        Hypernetwork().apply(load("tiny:sd1"), _decode(_sd1_only_file(tmp_path)), 1.0, name="sd1")


def _sd1_only_file(tmp_path):
    """A hypernetwork for SD1's real widths, which no tiny model has."""
    build_file(tmp_path / "sd1.pt", [768, 320], ENTRIES_B, SPEC_B)
    return tmp_path / "sd1.pt"
