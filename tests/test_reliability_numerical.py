"""Numerical faults: a NaN loss or a device out of memory stops training with one line of advice, and the
checkpoints saved before it stay good and resumable (at a new, lower learning rate if asked)."""

from __future__ import annotations

import math

import pytest
import torch

from sdtune import train as train_module
from sdtune.artifacts import load_artifact
from sdtune.checkpoints import list_checkpoints
from sdtune.cli import main

TRAIN = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--class-word", "dog", "--steps", "4",
         "--lr", "1e-2", "--checkpoint-every", "1", "--quiet", "--log-dir", "none"]


def _fail_at_step(monkeypatch, step: int, fault) -> None:
    """Make the loop's loss at optimizer step `step` (1-based) `fault()`: a value or an exception."""
    real, calls = train_module._micro_batch_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return fault(value) if len(calls) == step else value

    monkeypatch.setattr(train_module, "_micro_batch_loss", loss)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_nan_loss_stops_keeps_good_checkpoints_and_a_lower_lr_resumes(tmp_path, subject_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = TRAIN + ["--images", str(subject_dir), "--output", str(out), "--format", "sdtune"]
    _fail_at_step(monkeypatch, 3, lambda loss: loss * float("nan"))
    assert main(argv) == 2
    err = _error(capsys)
    for advice in ("diverged at step 3", "lower --lr (now 0.01)", "--max-grad-norm", "bf16 instead of fp16",
                   "--resume latest", "step-000002"):
        assert advice in err, (advice, err)
    assert not (out / "sks.safetensors").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]
    good, _ = load_artifact(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())

    monkeypatch.undo()  # the fault is gone; resume from step 2 with the learning rate set to 0
    assert main(argv + ["--resume", "latest", "--lr", "0"]) == 0
    final, metadata = load_artifact(out / "sks.safetensors")
    assert math.isfinite(float(metadata["final_loss"]))
    # lr 0 from step 3 on: the weights are exactly those of the last good checkpoint, so the new --lr was used
    changed = [k for k in good if not torch.equal(good[k].to(final[k].dtype), final[k])]
    assert not changed, changed[:3]


def test_out_of_memory_is_caught_with_the_settings_that_save_memory(tmp_path, subject_dir, capsys, monkeypatch):
    out = tmp_path / "out"

    def oom(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    _fail_at_step(monkeypatch, 2, oom)
    assert main(TRAIN + ["--images", str(subject_dir), "--output", str(out)]) == 2
    err = _error(capsys)
    for advice in ("out of memory on the GPU", "--batch-size 1", "--grad-accum", "--gradient-checkpointing",
                   "--mixed-precision bf16", "--use-8bit-adam", "--resolution", "--resume latest", "step-000001"):
        assert advice in err, (advice, err)
    assert not (out / "sks.safetensors").exists()


def test_out_of_memory_advice_reaches_library_callers_too(tmp_path, subject_dir, monkeypatch):
    """The UI and `sdtune compare` call train() directly: they get the same one-line advice as the CLI."""
    from sdtune.config import DataConfig, TrainConfig
    from sdtune.errors import SdtuneError
    from sdtune.methods.lora import LoRA
    from sdtune.model import load

    def oom(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    _fail_at_step(monkeypatch, 1, oom)
    with pytest.raises(SdtuneError, match="out of memory on the GPU; try --batch-size 1"):
        train_module.train(load("tiny:sd1"), LoRA(), TrainConfig(steps=2, log_dir="none"),
                           DataConfig(images=str(subject_dir), class_word="dog"), tmp_path / "out", "sks",
                           progress=False)


@pytest.mark.parametrize("saved", [False, True], ids=["no-checkpoint-yet", "after-a-checkpoint"])
def test_divergence_advice_says_where_a_resume_starts(tmp_path, saved):
    from sdtune.faults import diverged

    if saved:  # the advice names only a checkpoint whose (finite) weights it could read
        from safetensors.torch import save_file

        (tmp_path / "checkpoints" / "step-000007").mkdir(parents=True)
        (tmp_path / "checkpoints" / "step-000007" / "state.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp_path / "checkpoints" / "step-000007" / "trainable.safetensors"))
    message = str(diverged(9, float("inf"), 1e-4, tmp_path))
    assert "step 9" in message and "loss is inf" in message and "now 0.0001" in message
    assert ("step-000007" in message) == saved and ("--checkpoint-every" in message) != saved
