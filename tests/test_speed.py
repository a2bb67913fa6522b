"""The loop's speed settings: each keeps the loss curve; reading the loss less often still keeps a NaN from
the weights; auto picks eager on a CPU and a captured graph or compile on CUDA by run length."""

from __future__ import annotations

import pytest
import torch

from sdtune import unet_runner
from sdtune.config import DataConfig, TrainConfig
from sdtune.errors import SdtuneError
from sdtune.methods.lora import LoRA, LoRAConfig
from sdtune.model import load
from sdtune.speed import CUDA_SYNC_EVERY, resolve_compile, sync_interval
from sdtune.train import train

# Loss values agree to float rounding; weights to far less than training moved them (about 0.04 in 4 steps).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4


def _run(out, subject_dir, on_step=None, model=None, **options):
    cfg = LoRAConfig(rank=4, format="sdtune")
    model = model or load("tiny:sd1")
    train_cfg = TrainConfig(**{"steps": 4, "lr": 1e-2, "batch_size": 2, "log_dir": "none", "seed": 3, **options})
    result = train(model, LoRA(cfg), train_cfg, DataConfig(images=str(subject_dir), token="sks",
                                                                  class_word="dog"),
                   out, "a", progress=False, on_step=on_step)
    return result, LoRA(cfg).state_dict(model)


def _assert_same_training(result, weights, base, base_weights):
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(base.losses), rtol=LOSS_RTOL, atol=0)
    for key, value in base_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=WEIGHT_ATOL)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The CPU defaults' run: eager UNet, torch's default AdamW, the loss read every step."""
    from conftest import make_subject_images

    root = tmp_path_factory.mktemp("baseline")
    subject = make_subject_images(root / "subject")
    result, weights = _run(root / "out", subject)
    assert result.speed == {"compile": "off", "sync_every": "1", "fused_adam": "false"}
    moved = max(weights[k].abs().max().item() for k in weights if k.endswith("lora_B.weight"))
    assert moved > 100 * WEIGHT_ATOL, "training moved too little to compare"
    return subject, result, weights


@pytest.mark.parametrize("options, used", [
    ({"channels_last": True}, {"compile": "off"}),
    ({"adam_impl": "fused"}, {"fused_adam": "true", "sync_every": "1"}),
    ({"adam_impl": "foreach"}, {"fused_adam": "false"}),
    ({"adam_impl": "fused", "sync_every": 3}, {"fused_adam": "true", "sync_every": "3"}),
])
def test_each_speed_option_keeps_the_loss_curve(tmp_path, baseline, options, used):
    subject_dir, base, base_weights = baseline
    result, weights = _run(tmp_path / "fast", subject_dir, **options)
    assert used.items() <= result.speed.items()
    _assert_same_training(result, weights, base, base_weights)


def test_the_compiled_unet_path_keeps_the_loss_curve(tmp_path, subject_dir, monkeypatch):
    # Inductor compiles for minutes on a CPU; dynamo's eager backend runs the same wrapper and tracing.
    monkeypatch.setattr(unet_runner, "COMPILE_BACKEND", "eager")
    base, base_weights = _run(tmp_path / "base", subject_dir, steps=2)
    result, weights = _run(tmp_path / "compiled", subject_dir, steps=2, compile="default")
    assert result.speed["compile"] == "default"
    _assert_same_training(result, weights, base, base_weights)


def test_deferred_loss_reads_keep_a_nan_from_the_weights(tmp_path, subject_dir, monkeypatch):
    from sdtune import train as train_module

    real, calls, seen = train_module.per_sample_mse, [], []

    def poisoned(pred, target):  # steps 1 and 2 are fine; from step 3 on the loss is NaN
        calls.append(1)
        return real(pred, target) * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(train_module, "per_sample_mse", poisoned)
    model = load("tiny:sd1")
    with pytest.raises(SdtuneError, match="diverged at step 3"):
        _run(tmp_path / "nan", subject_dir, on_step=lambda done, loss: seen.append(done), model=model, steps=6,
             adam_impl="fused", sync_every=4)
    assert seen == [1, 2, 3], "the loss was read after step 4, not at the bad step itself"
    assert not (tmp_path / "nan" / "a.safetensors").exists()
    # The weights are exactly those of a clean 2-step run: steps 3 and 4 were skipped on the device.
    monkeypatch.setattr(train_module, "per_sample_mse", real)
    _, clean = _run(tmp_path / "clean", subject_dir, steps=2, adam_impl="fused", sync_every=4)
    after_nan = LoRA(LoRAConfig(rank=4)).state_dict(model)
    assert all(torch.equal(after_nan[k], clean[k]) for k in clean)


def test_auto_runs_eager_on_a_cpu_and_captures_or_compiles_on_cuda_by_run_length():
    assert resolve_compile("auto", "cpu", 10**7, True, 1, False) == "off"
    assert resolve_compile("auto", "cuda", 1_000, True, 1, False) == "cuda-graphs"
    assert resolve_compile("auto", "cuda", 10**7, True, 1, False) == "reduce-overhead"
    assert resolve_compile("auto", "cuda", 1_000, False, 1, False) == "off"  # aspect buckets change shapes
    assert resolve_compile("auto", "cuda", 1_000, True, 4, False) == "off"  # accumulated micro-batches
    assert resolve_compile("auto", "cuda", 1_000, True, 1, True) == "off"  # gradient checkpointing
    assert resolve_compile("auto", "cuda", 5, True, 1, False) == "off"  # too short to repay a capture
    assert resolve_compile("default", "cpu", 10, True, 1, False) == "default"
    with pytest.raises(SdtuneError, match="needs a CUDA device"):
        resolve_compile("cuda-graphs", "cpu", 10, True, 1, False)


def test_the_loss_is_read_every_step_unless_the_optimizer_can_skip_a_step_on_the_device():
    param = torch.nn.Parameter(torch.ones(2))
    fused, plain = torch.optim.AdamW([param], fused=True), torch.optim.AdamW([param])
    assert sync_interval(0, "cpu", fused, "no") == 1
    assert sync_interval(0, "cuda", fused, "bf16") == CUDA_SYNC_EVERY
    assert sync_interval(0, "cuda", plain, "bf16") == 1
    assert sync_interval(0, "cuda", fused, "fp16") == 1  # the gradient scaler owns the skip flag
    assert sync_interval(5, "cpu", fused, "no") == 5


def test_the_graph_runner_captures_once_per_input_layout_and_falls_back_when_capture_fails(monkeypatch):
    # CUDA graphs need a GPU (scripts/gpu_bench.sh checks them there); here the capture itself is stood in
    # for, to check the runner's bookkeeping around it on the real tiny UNet.
    from sdtune.conditioning import Conditioning

    unet = load("tiny:sd1").unet
    captured = []

    def fake_capture(call, args):
        captured.append(tuple(a.shape for a in args))
        return call

    monkeypatch.setattr(unet_runner, "_capture", fake_capture)
    runner = unet_runner.UNetRunner(unet, "cuda-graphs", [])
    noisy, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 900])
    cond = Conditioning(torch.randn(2, 77, 32))
    eager = unet(noisy, t, cond.hidden_states).sample
    for _ in range(2):
        torch.testing.assert_close(runner(noisy, t, cond), eager)
    runner(noisy[:1], t[:1], cond.select(slice(0, 1)))
    assert captured == [((2, 4, 16, 16), (2,), (2, 77, 32)), ((1, 4, 16, 16), (1,), (1, 77, 32))]

    def failing(call, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(unet_runner, "_capture", failing)
    with pytest.raises(SdtuneError, match="could not be captured"):
        unet_runner.UNetRunner(unet, "cuda-graphs", [])(noisy, t, cond)
    lenient = unet_runner.UNetRunner(unet, "cuda-graphs", [], strict=False)  # what auto asks for
    torch.testing.assert_close(lenient(noisy, t, cond), eager)
    assert lenient.mode == "off"
