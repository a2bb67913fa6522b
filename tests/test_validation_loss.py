"""The validation loss: held-out images at fixed noise and timesteps, read through the run, in the run card and
the tensorboard log; the same weights always give the same reading."""

from __future__ import annotations

import json

from safetensors import safe_open

from conftest import make_subject_images
from sdtune.cli import main


def _card(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_validation_loss_is_read_through_the_run_and_lands_in_the_card_and_the_log(tmp_path, subject_dir, capsys):
    held_out = make_subject_images(tmp_path / "held-out", count=2)
    out = tmp_path / "out"
    assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks",
                 "--class-word", "dog", "--steps", "4", "--validation-images", str(held_out),
                 "--validation-loss-every", "2", "--lr", "1e-2", "--output", str(out)]) == 0
    card = _card(out / "sks.safetensors")
    readings = json.loads(card["validation_losses"])
    assert [step for step, _ in readings] == [2, 4]
    assert float(card["validation_loss"]) == readings[-1][1] > 0
    assert readings[0][1] != readings[1][1]  # the weights changed between the readings, and so did the loss
    assert "step 2: validation loss" in capsys.readouterr().err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/loss")] == [2, 4]


def test_the_same_weights_give_the_same_validation_loss(tmp_path, subject_dir):
    held_out = make_subject_images(tmp_path / "held-out", count=2)
    values = []
    for run in ("a", "b"):  # lr 0: the weights never change, so every reading must be the same number
        assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "3",
                     "--lr", "0", "--validation-images", str(held_out), "--validation-loss-every", "1", "--quiet",
                     "--log-dir", "none", "--output", str(tmp_path / run)]) == 0
        values += [v for _, v in json.loads(_card(tmp_path / run / "sks.safetensors")["validation_losses"])]
    assert len(values) == 6 and len(set(values)) == 1


def test_bad_validation_images_are_refused_before_the_model_loads(tmp_path, subject_dir, capsys):
    assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "1",
                 "--validation-images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "out").exists()
