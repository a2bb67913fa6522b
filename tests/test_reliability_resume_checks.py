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


# Case 7: non-finite weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,shown", [("--weight-decay", "inf", "inf"), ("--lr", "nan", "NaN")])
def test_a_non_finite_weight_decay_or_lr_is_refused_before_training(tmp_path, subject_dir, flag, value, shown,
                                                                    capsys):
    out = tmp_path / "out"
    assert main(_argv(subject_dir, out, flag, value)) == 2
    assert f"{flag[2:].replace('-', '_')} is {shown}; give a finite number" in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("speed", [[], ["--adam-impl", "fused", "--sync-every", "4"]], ids=["default", "fused"])
@pytest.mark.parametrize("steps,every", [(1, 0), (3, 1)], ids=["artifact", "checkpoint"])
def test_non_finite_weights_are_never_written(tmp_path, subject_dir, steps, every, speed):
    """The loss of step 1 is finite (it is computed before the update), but an infinite weight decay turns the
    weights into NaN: neither the checkpoint nor the artifact may be written (also with a fused optimizer,
    whose device-side skip only reacts to a non-finite loss). Called as a library: no config validation."""
    from sdtune.config import DataConfig, TrainConfig
    from sdtune.methods.lora import LoRA, LoRAConfig
    from sdtune.model import load

    cfg = TrainConfig(steps=steps, checkpoint_every=every, weight_decay=float("inf"), log_dir="none",
                      adam_impl=speed[1] if speed else "auto", sync_every=int(speed[3]) if speed else 0)
    out = tmp_path / "out"
    with pytest.raises(SdtuneError) as caught:
        train_module.train(load("tiny:sd1"), LoRA(LoRAConfig(rank=1)), cfg,
                           DataConfig(images=str(subject_dir), class_word="dog"), out, "sks", progress=False)
    message = str(caught.value)
    for words in ("non-finite", "by step 1", "--weight-decay (now inf)", "--lr (now 0.0001)", "no checkpoint"):
        assert words in message, (words, message)
    assert len(message.splitlines()) == 1
    assert not (out / "sks.safetensors").exists() and list_checkpoints(out) == []


def test_the_resume_advice_only_names_a_checkpoint_with_finite_weights(tmp_path, subject_dir, capsys):
    good, bad = _with_checkpoints(tmp_path / "out", GOLDEN, "step-000002", "step-000003")
    _poison(bad)
    advice = str(diverged(4, float("nan"), 1e-4, tmp_path / "out"))
    assert f"--resume {good} " in advice and "step-000003" not in advice, advice

    _poison(good)
    advice = str(diverged(4, float("nan"), 1e-4, tmp_path / "out"))
    assert "--resume" not in advice and "no checkpoint with finite weights" in advice, advice

    before = _snapshot(tmp_path / "out")  # resuming from a NaN checkpoint (older versions saved them): refused
    assert main(_argv(subject_dir, tmp_path / "out", "--steps", "5", "--resume", "latest")) == 2
    assert "step-000003 holds non-finite weights" in _error(capsys)
    assert _snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("alpha", ["nan", "inf", "-1"])
def test_extract_lora_refuses_a_non_finite_or_negative_alpha_before_loading(tmp_path, alpha, capsys):
    out = tmp_path / "lora.safetensors"
    # The tuned model does not exist: only a refusal before loading names --alpha.
    code = main(["extract-lora", "--base", "tiny:sd1", "--tuned", str(tmp_path / "missing"), "--rank", "1",
                 f"--alpha={alpha}", "--output", str(out)])
    assert code == 2
    assert f"--alpha is {float(alpha):g}" in _error(capsys)
    assert not out.exists()


# Case 8: resume checks -------------------------------------------------------------------------------------

MISMATCHES = {  # run flags -> words the one-line refusal holds
    "rank": (["--rank", "2"], "does not fit this run's trained tensors"),
    "targets": (["--lora-targets", "attn,ff"], "which this run trains"),
    "text-encoder": (["--train-text-encoder"], "which this run trains"),
    "loraplus": (["--loraplus-ratio", "16"], "optimizer groups of [64] parameters, this run [32, 32]"),
    "family": (["--model", "tiny:sd2"], "family sd1, this run's is sd2; resume with the same --model"),
    "fewer-steps": (["--steps", "1"], "at step 2, past this run's --steps 1; resume with --steps 3 or more"),
}


@pytest.mark.parametrize("case", MISMATCHES, ids=list(MISMATCHES))
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_in_one_line(tmp_path, subject_dir, current_checkpoint,
                                                                       case, capsys):
    flags, words = MISMATCHES[case]
    out = tmp_path / "out"
    _with_checkpoints(out, current_checkpoint, "step-000002")
    before = _snapshot(out)
    assert main(_argv(subject_dir, out, "--resume", "latest", *flags)) == 2
    err = _error(capsys)
    assert words in err and "step-000002" in err, err
    assert _snapshot(out) == before  # nothing written, nothing replaced


def test_another_method_is_named(tmp_path, subject_dir, current_checkpoint, capsys):
    out = tmp_path / "out"
    _with_checkpoints(out, current_checkpoint, "step-000002")
    argv = ["train", "textual-inversion", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "<t>",
            "--init-word", "toy", "--steps", "3", "--quiet", "--log-dir", "none", "--output", str(out),
            "--resume", "latest"]
    assert main(argv) == 2
    assert "trained with method lora, this run's is textual-inversion" in _error(capsys)


@pytest.mark.parametrize("flags", [["--rank", "2"], ["--loraplus-ratio", "16"], ["--steps", "1"]],
                         ids=["rank", "loraplus", "fewer-steps"])
def test_checkpoints_from_before_the_records_are_checked_too(tmp_path, subject_dir, flags, capsys):
    out = tmp_path / "out"
    _with_checkpoints(out, GOLDEN, "step-000002")
    assert main(_argv(subject_dir, out, "--resume", "latest", *flags)) == 2
    assert "step-000002" in _error(capsys)


DAMAGED = {
    "not-json": ("{step: 2", "not readable JSON"),
    "not-an-object": ("[2]", "not a JSON object"),
    "missing-step": ('{"losses": []}', "'step' is None, not a whole number"),
    "step-text": ('{"step": "2", "losses": []}', "'step' is '2', not a whole number"),
    "losses-text": ('{"step": 2, "losses": [1.0, "x"]}', "'losses' holds 'x'"),
    "family-number": ('{"step": 2, "losses": [], "family": 1}', "'family' is 1, not text"),
}


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_state_json_is_one_line(tmp_path, subject_dir, case, capsys):
    text, words = DAMAGED[case]
    out = tmp_path / "out"
    (checkpoint,) = _with_checkpoints(out, GOLDEN, "step-000002")
    (checkpoint / "state.json").write_text(text)
    assert main(_argv(subject_dir, out, "--resume", "latest")) == 2
    err = _error(capsys)
    assert "step-000002 has a damaged state.json" in err and words in err, err


def test_checkpoints_order_by_step_number_past_a_million(tmp_path, subject_dir):
    """`latest` is step 1,000,000 (not 999,999, which sorts after it as text), and the pruning after step
    1,000,001 drops step 999,999, keeping the newest two."""
    out = tmp_path / "out"
    _with_checkpoints(out, GOLDEN, "step-999999", "step-1000000")
    assert [p.name for p in list_checkpoints(out)] == ["step-999999", "step-1000000"]
    argv = _argv(subject_dir, out, "--steps", "1000002", "--keep-checkpoints", "2", "--resume", "latest")
    assert main(argv) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step-1000000", "step-1000001"]


def test_a_checkpoint_from_before_the_records_still_resumes(tmp_path, subject_dir):
    out = tmp_path / "out"
    _with_checkpoints(out, GOLDEN, "step-000002")
    assert main(_argv(subject_dir, out, "--resume", "latest", "--keep-checkpoints", "5")) == 0
    _, card = load_artifact(out / "final.safetensors")
    assert card["steps"] == "3" and card["lora_rank"] == "1"
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]  # only step 3 trained: no new checkpoint
