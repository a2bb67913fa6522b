"""Resume safety and non-finite weights (hostile-input cases 7 and 8): weights with a NaN or inf are never
written and never recommended for a resume; a checkpoint that does not fit the run resuming it (method, base
model, trained tensors, optimizer groups, steps), or whose state.json is damaged, is refused in one line
before anything is written; checkpoints order by step number; checkpoints from before these checks resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune import train as train_module
from sdtune.artifacts import load_artifact
from sdtune.checkpoints import list_checkpoints
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.faults import diverged

# Written by sdtune before checkpoints recorded their run: `train lora --model tiny:sd1 --rank 1 --steps 3
# --lr 5e-3 --seed 3 --checkpoint-every 1 --keep-checkpoints 1` on conftest's subject images (step 2 of 3).
GOLDEN = Path(__file__).parent / "golden" / "resume-lora-sd1-rank1" / "checkpoints" / "step-000002"


def _argv(images: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "lora", "--model", "tiny:sd1", "--images", str(images), "--token", "sks", "--class-word", "dog",
            "--rank", "1", "--steps", "3", "--lr", "5e-3", "--seed", "3", "--checkpoint-every", "1", "--quiet",
            "--log-dir", "none", "--name", "final", "--output", str(out), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _with_checkpoints(out: Path, source: Path, *names: str) -> list[Path]:
    """`out` holding copies of checkpoint `source` under `names` (state.json's step follows the name)."""
    copies = []
    for name in names:
        target = out / "checkpoints" / name
        shutil.copytree(source, target)
        state = json.loads((target / "state.json").read_text())
        (target / "state.json").write_text(json.dumps({**state, "step": int(name.split("-")[1])}))
        copies.append(target)
    return copies


def _poison(checkpoint: Path) -> None:
    """Make a checkpoint's weights NaN, as sdtune before this check could save them."""
    path = checkpoint / "trainable.safetensors"
    tensors, metadata = load_artifact(path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(path), metadata)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def current_checkpoint(tmp_path_factory) -> Path:
    """A step-2 checkpoint written by this version (with its run records), from the golden run's settings."""
    from conftest import make_subject_images

    root = tmp_path_factory.mktemp("current")
    images = make_subject_images(root / "subject")
    assert main(_argv(images, root / "out", "--keep-checkpoints", "1")) == 0
    return root / "out" / "checkpoints" / "step-000002"


@pytest.mark.parametrize("alpha", ["nan", "inf", "-1"])
def test_extract_lora_refuses_a_non_finite_or_negative_alpha_before_loading(tmp_path, alpha, capsys):
    out = tmp_path / "lora.safetensors"
    # The tuned model does not exist: only a refusal before loading names --alpha.
    code = main(["extract-lora", "--base", "tiny:sd1", "--tuned", str(tmp_path / "missing"), "--rank", "1",
                 f"--alpha={alpha}", "--output", str(out)])
    assert code == 2
    assert f"--alpha is {float(alpha):g}" in _error(capsys)
    assert not out.exists()
