"""Crash safety: SIGKILL a training process right after a checkpoint lands, run the same command with
`--resume latest`, and the final weights are bit-identical to an uninterrupted run, for all four methods
(DreamBooth with an EMA, which checkpoints carry). A kill never leaves a damaged file under a final name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sdtune.artifacts import load_artifact
from sdtune.checkpoints import list_checkpoints
from sdtune.cli import main
from sdtune.runtime import one_thread  # as the subprocesses (OMP_NUM_THREADS=1): the same float sums

STEPS = 8
# method -> (its own flags, the checkpoint after which the process is killed: an arbitrary step)
RUNS: dict[str, tuple[list[str], int]] = {
    "lora": (["--rank", "2"], 1),
    "textual-inversion": (["--token", "<sks-toy>", "--init-word", "toy"], 3),
    "dreambooth": (["--ema-decay", "0.9"], 2),
    "hypernetwork": (["--activation", "relu", "--dropout", "0.2"], 2),
}


def _argv(method: str, images: Path, out: Path) -> list[str]:
    flags, _ = RUNS[method]
    return ["train", method, "--model", "tiny:sd1", "--images", str(images), "--token", "sks", "--class-word", "dog",
            "--steps", str(STEPS), "--lr", "5e-3", "--seed", "3", "--checkpoint-every", "1", "--quiet",
            "--log-dir", "none", "--name", "final", "--output", str(out), *flags]


def _kill_after_checkpoints(procs: dict[str, subprocess.Popen], outs: dict[str, Path]) -> None:
    """Watch each process's checkpoints folder; SIGKILL it the moment its chosen checkpoint exists."""
    waiting = dict(procs)
    deadline = time.monotonic() + 240
    while waiting and time.monotonic() < deadline:
        for method, proc in list(waiting.items()):
            reached = outs[method] / "checkpoints" / f"step-{RUNS[method][1]:06d}"
            if reached.is_dir() or proc.poll() is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                del waiting[method]
        time.sleep(0.002)
    for proc in waiting.values():
        proc.kill()


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_artifact(out / "final.safetensors")
    return tensors


def _assert_every_final_name_is_complete(out: Path) -> None:
    """After a kill: each checkpoint under its final name loads; only hidden temp folders may be partial."""
    checkpoints = list_checkpoints(out)
    assert checkpoints, "killed before any checkpoint"
    for folder in checkpoints:
        load_artifact(folder / "trainable.safetensors")
        load_artifact(folder / "optimizer.pt")
        assert json.loads((folder / "state.json").read_text())["step"] == int(folder.name.split("-")[1])
    assert not (out / "final.safetensors").exists(), "the killed run finished before the kill"


def test_sigkill_then_resume_gives_bit_identical_weights_for_every_method(tmp_path, subject_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = {m: tmp_path / f"killed-{m}" for m in RUNS}
    procs = {m: subprocess.Popen([sys.executable, "-m", "sdtune.cli", *_argv(m, subject_dir, out)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for m, out in killed.items()}
    watcher = threading.Thread(target=_kill_after_checkpoints, args=(procs, killed))
    watcher.start()
    try:
        with one_thread():
            for method in RUNS:  # the uninterrupted runs, in this process while the others run and die
                assert main(_argv(method, subject_dir, tmp_path / f"whole-{method}")) == 0
    finally:
        watcher.join()
    for method, out in killed.items():
        assert procs[method].returncode == -signal.SIGKILL, method
        _assert_every_final_name_is_complete(out)
        half_written = out / "checkpoints" / ".step-000099.x1y2.tmp"  # as a kill in the middle of a save leaves
        half_written.mkdir(exist_ok=True)
        (half_written / "trainable.safetensors").write_bytes(b"\0" * 10)
        with one_thread():
            assert main(_argv(method, subject_dir, out) + ["--resume", "latest"]) == 0
        assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "temp folders left"
        whole, resumed = _final_weights(tmp_path / f"whole-{method}"), _final_weights(out)
        assert whole.keys() == resumed.keys() and whole, method
        different = [k for k in whole if not torch.equal(whole[k], resumed[k])]
        assert not different, f"{method}: {len(different)} tensors differ after resume, e.g. {different[0]}"


def test_a_kill_while_an_old_checkpoint_is_deleted_never_leaves_it_listed(tmp_path, monkeypatch):
    """Rotation deletes the oldest checkpoint right after a new one lands: a kill in the middle of that
    deletion (files gone one by one) must not leave a folder that lists as complete but lacks weights."""
    import shutil

    from sdtune import checkpoints

    old = checkpoints.folder(tmp_path) / "step-000001"
    old.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
        (old / name).write_text("x")

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "trainable.safetensors").unlink()
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    try:
        checkpoints._remove(old)
    except KeyboardInterrupt:
        pass
    assert checkpoints.list_checkpoints(tmp_path) == []
