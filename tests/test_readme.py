"""The README's commands work as written: every line of its shell blocks runs, in order, in one folder, with
trainings capped by SDTUNE_MAX_STEPS; lines tagged [manual] (a GPU, a download, several processes, a long
run) are left to people, and anything else that is not an sdtune command must carry that tag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sdtune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
MANUAL = "[manual]"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def readme_commands(text: str) -> list[str]:
    """The shell lines of the README that the test runs (continuations joined, comments and [manual] dropped)."""
    commands = []
    for block in BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#") or MANUAL in line:
                continue
            commands.append(line.split(" #")[0].strip())
    return commands


def test_every_untagged_readme_command_is_an_sdtune_command():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10
    others = [c for c in commands if not c.startswith("sdtune ")]
    assert not others, f"tag these {MANUAL} or make them sdtune commands: {others}"


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDTUNE_MAX_STEPS", "2")
    for command in readme_commands(README.read_text(encoding="utf-8")):
        argv = shlex.split(command)[1:]
        code = main(argv)
        assert code == 0, f"{command}\n{capsys.readouterr().err}"
    assert (tmp_path / "out" / "sks.safetensors").is_file() and (tmp_path / "out" / "db" / "sks").is_dir()


def test_readme_parsing_drops_manual_lines_and_joins_continuations():
    text = "```sh\nsdtune a \\\n  --b c   # note\nmake demo  # [manual] slow\n# comment\n```\n"
    assert readme_commands(text) == ["sdtune a    --b c"]


@pytest.mark.parametrize("line", ["pip install x", "torchrun -m sdtune.cli train lora"])
def test_a_readme_line_that_is_no_sdtune_command_must_be_tagged(line):
    assert readme_commands(f"```sh\n{line}\n```\n") == [line]
    assert readme_commands(f"```sh\n{line}  # {MANUAL}\n```\n") == []
