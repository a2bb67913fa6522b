"""A new user's first hour on the builtin model: its subject from the CLI, defaults that are the builtin recipe,
and Textual Inversion that trains and generates with no flag beyond the images and class word."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from sdtune.cli import main


def _subject(tmp_path, capsys):
    folder = tmp_path / "subject"
    assert main(["subject", str(folder)]) == 0
    capsys.readouterr()
    return folder


def test_subject_writes_the_builtin_subject_with_captions_and_never_mixes_it_into_other_files(tmp_path, capsys):
    folder = _subject(tmp_path, capsys)
    images, captions = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert len(images) == len(captions) == 5
    assert all(Image.open(p).size == (32, 32) for p in images)
    assert all("sks circle" in p.read_text() for p in captions)
    assert main(["subject", str(folder)]) == 0  # its own files: rewritten
    (folder / "mine.png").write_bytes(b"x")
    assert main(["subject", str(folder)]) == 2
    assert "mine.png" in capsys.readouterr().err and (folder / "mine.png").read_bytes() == b"x"


def test_on_the_builtin_model_the_defaults_are_its_recipe_and_flags_still_win(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDTUNE_MAX_STEPS", "1")
    folder = _subject(tmp_path, capsys)
    base = ["train", "lora", "--images", str(folder), "--class-word", "circle", "--quiet", "--log-dir", "none"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "sks.config.json").read_text())
    assert config["TrainConfig"]["lr"] == 5e-3 and config["TrainConfig"]["batch_size"] == 4
    assert config["LoRAConfig"]["rank"] == 8 and config["LoRAConfig"]["targets"] == "attn,conv"
    assert config["TrainConfig"]["steps"] == 1  # capped by SDTUNE_MAX_STEPS
    assert main([*base, "--lr", "1e-3", "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "sks.config.json").read_text())["TrainConfig"]["lr"] == 1e-3
    assert main([*base, "--model", "tiny:sd1", "--output", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "sks.config.json").read_text())["TrainConfig"]["lr"] == 1e-4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "lora", "--help"])
    assert "steps 400, lr 0.005, batch_size 4, rank 8, targets attn,conv" in " ".join(capsys.readouterr().out.split())


def test_textual_inversion_with_no_other_flag_trains_and_generates_by_the_word_the_run_prints(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.setenv("SDTUNE_MAX_STEPS", "3")
    folder = _subject(tmp_path, capsys)
    out = tmp_path / "out"
    assert main(["train", "textual-inversion", "--model", "builtin", "--images", str(folder),
                 "--class-word", "circle", "--output", str(out)]) == 0
    *_, hint, client = capsys.readouterr().err.strip().splitlines()
    assert hint.startswith("generate with: sdtune generate ") and "write _sks_ in the prompt" in client
    argv = shlex.split(hint.removeprefix("generate with: sdtune "))
    common = ["--steps", "5", "--seed", "1"]
    assert main([*argv, *common, "--output", str(tmp_path / "with.png")]) == 0
    without = [a.replace("<sks>", "") for a in argv]  # the same prompt without the learned word
    assert main([*without, *common, "--output", str(tmp_path / "no.png")]) == 0
    with_it, without_it = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("with", "no"))
    assert np.abs(with_it - without_it).mean() > 1.0  # the embedding changed the image


def test_the_textual_inversion_token_refusal_names_where_to_set_it_in_the_cli_and_the_ui(tmp_path, capsys):
    folder = _subject(tmp_path, capsys)
    assert main(["train", "textual-inversion", "--model", "builtin", "--images", str(folder), "--token", "sks",
                 "--class-word", "circle", "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'sks' is already a token" in err and "--token" in err and "Token in the web UI" in err


def test_a_lora_variant_on_builtin_trains_with_its_own_compare_row(capsys):
    """`--algo loha` (or `--dora`) on the builtin model starts from the loha (lora-dora) row's recipe, not plain
    LoRA's: the rate the comparison measured for that algorithm."""
    from sdtune.compare.recipes import training_defaults

    assert training_defaults("builtin", "lora", {"algo": "loha"})["train"]["lr"] == 1e-2
    assert training_defaults("builtin", "lora", {"algo": "lokr"})["lora"]["lokr_factor"] == 4
    assert training_defaults("builtin", "lora", {"dora": True})["lora"]["dora"] is True
    assert training_defaults("builtin", "lora", {"rank": 4})["train"]["lr"] == 5e-3  # not a recipe key
    with pytest.raises(SystemExit):
        main(["train", "lora", "--help"])
    assert "pick the compare row whose recipe is used (lora, loha, lokr, lora-dora)" in \
        " ".join(capsys.readouterr().out.split())


def test_train_lora_algo_loha_on_builtin_records_the_loha_rate(tmp_path, capsys, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("SDTUNE_MAX_STEPS", "1")
    folder = _subject(tmp_path, capsys)
    assert main(["train", "lora", "--algo", "loha", "--model", "builtin", "--images", str(folder),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 0
    with safe_open(tmp_path / "out" / "sks.safetensors", "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["TrainConfig"]["lr"] == 1e-2 and config["LoRAConfig"]["algo"] == "loha"
