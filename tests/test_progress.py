"""Progress people can read: plain lines (no carriage returns) when the output is a file, and nothing at all
with --quiet."""

from __future__ import annotations

import io

from sdtune.cli import main
from sdtune.progress import Lines


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_train_lines_say_step_loss_rate_and_eta_at_most_every_tenth():
    clock, stream = FakeClock(), io.StringIO()
    lines = Lines(1000, 0, "train", "step", stream, clock)
    for step in range(1, 1001):
        clock.now += 0.5  # 2 steps/s
        lines.set_postfix(loss=f"{1 / step:.4f}")
        lines.update(1)
        if step == 100:
            assert stream.getvalue().splitlines()[-1] == \
                "train: step 100/1000, loss 0.0100, 2.00 step/s, elapsed 00:50, ETA 07:30"
    text = stream.getvalue()
    assert "\r" not in text and len(text.splitlines()) <= 10 + 500 / 60 + 1


def test_train_piped_to_a_file_writes_lines_and_quiet_writes_nothing(tmp_path, subject_dir, capsys):
    argv = ["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks", "--class-word",
            "dog", "--steps", "2", "--log-dir", "none", "--validation-every", "1"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "train: step 2/2, loss " in err and len(err.splitlines()) <= 3, err
    # --quiet silences everything, the validation images' diffusers sampling bars included
    assert main([*argv, "--output", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "b" / "validation" / "step-000002.png").is_file()
