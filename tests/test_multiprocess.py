"""Several CPU processes (torchrun + gloo) train like one process with the same global batch: DDP for every
method, FSDP (sharded) for DreamBooth; a process that stops answering stops the others with one line."""

from __future__ import annotations

import os
import shlex
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
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_line(method: str) -> tuple[list[str], list[str]]:
    """The README's 2-CPU-process torchrun line for `method`: (torchrun's flags, sdtune's arguments). Tests
    run it with their own settings after it (a repeated flag's last value wins)."""
    lines = [line for line in README.read_text(encoding="utf-8").splitlines()
             if line.startswith("torchrun") and "tests/test_multiprocess.py runs this line" in line
             and f" train {method} " in line]
    assert len(lines) == 1, f"the README lacks its 2-process {method} line"
    argv = shlex.split(lines[0].split(" #")[0])
    module = argv.index("-m")
    return argv[1:module], argv[module + 2:]


def torchrun(launch: list[str], argv: list[str], **popen) -> subprocess.Popen:
    """`torchrun LAUNCH -m sdtune.cli ARGV` (started, not waited for) with one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([TORCHRUN, *launch, "-m", "sdtune.cli", *argv], env=env, text=True, **popen)


def run_to_end(launch: list[str], argv: list[str]) -> None:
    process = torchrun(launch, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]


def test_two_processes_equal_one_process_with_the_same_global_batch(subject_dir, tmp_path):
    two = tmp_path / "two"
    # 2 processes x batch 1 x 2 accumulated micro-batches (DDP skips the exchange on the first: no_sync)
    launch, readme = readme_line("lora")
    run_to_end([*launch, "--master_port", "29561"],
               [*readme, *COMMON[2:], "--images", str(subject_dir), "--batch-size", "1", "--grad-accum", "2",
                "--output", str(two)])
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
    launch, readme = readme_line("dreambooth")
    assert "fsdp" in readme
    sharded_run = [*launch, "--master_port", "29562"], \
        [*readme, *dreambooth[2:], "--batch-size", "1", "--checkpoint-every", "10", "--output", str(two)]
    run_to_end(*sharded_run)
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

    # Each process wrote its shard of step 10; resuming it on two processes ends on the same weights, bit for bit.
    assert sorted(p.name for p in (two / "checkpoints" / "step-000010" / "shards").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (two / "checkpoints" / "step-000010" / "trainable.safetensors").exists()
    run_to_end(sharded_run[0], [*sharded_run[1], "--resume", "latest"])
    resumed, _ = load_artifact(two / "sks.safetensors")
    assert all(torch.equal(resumed[key], sharded[key]) for key in sharded)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_process_that_stops_answering_stops_the_other_and_resume_continues(subject_dir, tmp_path):
    """Two "machines" on localhost (one torchrun each, ranks by --node-rank); SIGSTOP one worker, so its
    launcher does not tear the job down: the other gives up after --distributed-timeout with one line."""
    run = [*COMMON, "--steps", "12", "--images", str(subject_dir), "--checkpoint-every", "2"]  # the later --steps wins
    out = tmp_path / "run"
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in (0, 1)]
    nodes = [torchrun(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                       "--rdzv-endpoint", "localhost:29563"],
                      [*run, "--batch-size", "1", "--distributed-timeout", "10", "--output", str(out)],
                      stdout=log, stderr=subprocess.STDOUT) for rank, log in zip((0, 1), logs)]
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000002" / "state.json").is_file():
            assert nodes[0].poll() is None and time.monotonic() < deadline, (tmp_path / "node0.log").read_text()
            time.sleep(0.02)
        worker = children(nodes[1].pid)[0]
        os.kill(worker, signal.SIGSTOP)
        assert nodes[0].wait(timeout=120) != 0
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGKILL)  # the stopped worker this test started
        for node in nodes:
            node.wait(timeout=60)
    said = [line for line in (tmp_path / "node0.log").read_text().splitlines() if "stopped answering" in line]
    assert len(said) == 1 and "rank 1 of 2" in said[0] and "--resume latest" in said[0], said
    assert not (out / "sks.safetensors").exists()

    # One process with the doubled batch continues it (2 x 1 trains like 1 x 2) to the uninterrupted weights.
    assert main([*run, "--batch-size", "2", "--resume", "latest", "--output", str(out)]) == 0
    assert main([*run, "--batch-size", "2", "--output", str(tmp_path / "whole")]) == 0
    resumed, _ = load_artifact(out / "sks.safetensors")
    whole, _ = load_artifact(tmp_path / "whole" / "sks.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-3, atol=5e-5)
