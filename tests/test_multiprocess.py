"""Several CPU processes (torchrun + gloo) train like one process with the same global batch: DDP for every
method, FSDP (sharded) for DreamBooth; a process that stops answering stops the others with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdtune.artifacts import load_artifact
from sdtune.cli import main

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
COMMON = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--steps", "3", "--lr", "1e-2",
          "--format", "sdtune", "--quiet", "--log-dir", "none"]
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")


def torchrun(launch: list[str], argv: list[str], **popen) -> subprocess.Popen:
    """`torchrun LAUNCH -m sdtune.cli ARGV` with one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([TORCHRUN, *launch, "-m", "sdtune.cli", *argv], env=env, text=True, **popen)


def run_to_end(launch: list[str], argv: list[str]) -> None:
    process = torchrun(launch, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]


def test_two_processes_equal_one_process_with_the_same_global_batch(subject_dir, tmp_path):
    two = tmp_path / "two"
    # 2 processes x batch 1 x 2 accumulated micro-batches (DDP skips the exchange on the first: no_sync)
    run_to_end(["--nproc_per_node", "2", "--master_port", "29561"],
               [*COMMON, "--images", str(subject_dir), "--batch-size", "1", "--grad-accum", "2", "--output", str(two)])
    one = tmp_path / "one"
    assert main([*COMMON, "--images", str(subject_dir), "--batch-size", "4", "--output", str(one)]) == 0
    a, card = load_artifact(two / "sks.safetensors")
    b, single = load_artifact(one / "sks.safetensors")
    assert (card["world_size"], card["distributed"]) == ("2", "ddp") and single["world_size"] == "1"
    moved = max(b[k].abs().max().item() for k in b if k.endswith("lora_B.weight"))
    assert moved > 5e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5)


def logged_losses(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def test_fsdp_two_processes_train_dreambooth_like_one_process_with_the_doubled_batch(subject_dir, tmp_path):
    dreambooth = ["train", "dreambooth", "--model", "tiny:sd1", "--token", "sks", "--steps", "20", "--lr", "1e-3",
                  "--quiet", "--images", str(subject_dir)]
    two, one = tmp_path / "two", tmp_path / "one"
    run_to_end(["--nproc_per_node", "2", "--master_port", "29562"],
               [*dreambooth, "--batch-size", "1", "--distributed", "fsdp", "--output", str(two)])
    assert main([*dreambooth, "--batch-size", "2", "--output", str(one)]) == 0

    sharded, card = load_artifact(two / "sks.safetensors")
    whole, single = load_artifact(one / "sks.safetensors")
    assert (card["world_size"], card["distributed"]) == ("2", "fsdp")
    losses, expected = logged_losses(two), logged_losses(one)
    assert len(losses) == len(expected) == 20
    for step, (got, want) in enumerate(zip(losses, expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: {got} != {want}"
    # each process held about half of the trained values, their gradients and Adam's moments
    assert int(card["trainable_state_bytes"]) <= 0.55 * int(single["trainable_state_bytes"])
    assert sharded.keys() == whole.keys()  # the gathered model, saved whole in the usual single-file layout
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-3, atol=2e-3)
    assert (two / "sks" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # and the pipeline folder
