"""Two CPU processes (torchrun + gloo) train the same LoRA as one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sdtune.artifacts import load_artifact
from sdtune.cli import main

COMMON = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--steps", "3", "--lr", "1e-2",
          "--format", "sdtune", "--quiet", "--log-dir", "none"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun is not installed")
def test_two_processes_equal_one_process_with_the_same_global_batch(subject_dir, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29561", "-m", "sdtune.cli", *COMMON,
                          "--images", str(subject_dir), "--batch-size", "1", "--output", str(two)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    one = tmp_path / "one"
    assert main([*COMMON, "--images", str(subject_dir), "--batch-size", "2", "--output", str(one)]) == 0
    a, card = load_artifact(two / "sks.safetensors")
    b, single = load_artifact(one / "sks.safetensors")
    assert card["world_size"] == "2" and single["world_size"] == "1"
    moved = max(b[k].abs().max().item() for k in b if k.endswith("lora_B.weight"))
    assert moved > 5e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5)
