"""What a new user reads first: --help names every setting's allowed values and default; --version works."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sdtune import __version__
from sdtune.cli import main
from sdtune.config import TrainConfig


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_train_help_shows_every_settings_default_and_the_allowed_values(capsys):
    text = _help(capsys, "train", "lora")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        entry = re.search(re.escape(flag) + r"\b.*?default: ", text)
        assert entry, f"{flag} has no default in --help"
    for values in ("one of: auto, cpu, cuda, mps", "one of: no, fp16, bf16", "one of: constant,"):
        assert values in text, values
    assert "file layout written (diffusers: LoRA and DoRA only); one of: kohya, diffusers, sdtune; default: kohya" \
        in text  # the method's own
    assert "one of: lora, loha, lokr; default: lora" in text


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"sdtune {__version__}"
