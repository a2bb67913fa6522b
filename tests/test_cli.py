"""The CLI contract: commands, outputs, config files, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

from sdtune.cli import main

TRAIN = ["train", "lora", "--token", "sks", "--class-word", "dog", "--steps", "2", "--quiet", "--log-dir", "none"]


def _run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "generate", "convert", "inspect"):
        assert command in out


@pytest.mark.parametrize("case", ["missing", "empty", "not_image", "truncated", "zero_byte"])
def test_bad_image_folders_are_refused_by_name(capsys, tmp_path, subject_dir, case):
    images = tmp_path / "images"
    if case == "missing":
        named = "images"
    else:
        images.mkdir()
        named = {"empty": "images", "not_image": "notes.jpg", "truncated": "cut.png", "zero_byte": "nothing.png"}[case]
        if case != "empty":
            for source in subject_dir.iterdir():
                (images / source.name).write_bytes(source.read_bytes())
        if case == "not_image":
            (images / "notes.jpg").write_text("this is not a picture")
        elif case == "truncated":
            (images / "cut.png").write_bytes((subject_dir / "subject_0.png").read_bytes()[:60])
        elif case == "zero_byte":
            (images / "nothing.png").write_bytes(b"")
    out = tmp_path / "out"
    err = _run_error(capsys, TRAIN + ["--model", "tiny:sd1", "--images", str(images), "--output", str(out)])
    assert named in err
    assert not list(out.glob("*.safetensors"))


def test_unknown_model_spec_is_refused(capsys, tmp_path, subject_dir):
    err = _run_error(capsys, TRAIN + ["--model", "tiny:sd9", "--images", str(subject_dir), "--output", str(tmp_path)])
    assert "tiny:sd9" in err
    err = _run_error(capsys, TRAIN + ["--model", str(tmp_path), "--images", str(subject_dir), "--output", str(tmp_path)])
    assert "not a diffusers pipeline" in err


@pytest.mark.parametrize("flag,value,field", [("--steps", "-3", "steps"), ("--rank", "0", "rank"),
                                              ("--lr", "nan", "lr"), ("--mixed-precision", "fp8", "mixed_precision")])
def test_invalid_config_values_name_the_field(capsys, tmp_path, subject_dir, flag, value, field):
    argv = TRAIN + ["--model", "tiny:sd1", "--images", str(subject_dir), "--output", str(tmp_path / "o"), flag, value]
    err = _run_error(capsys, argv)
    assert field in err


@pytest.mark.parametrize("low,high", [("900", "100"), ("0", "1001"), ("500", "500")])
def test_a_bad_timestep_range_is_refused_before_anything_is_written(capsys, tmp_path, subject_dir, low, high):
    out = tmp_path / "o"
    err = _run_error(capsys, TRAIN + ["--model", "tiny:sd1", "--images", str(subject_dir), "--output", str(out),
                                      "--min-timestep", low, "--max-timestep", high])
    assert f"min_timestep {low} / max_timestep {high}" in err and "1000" in err
    assert not list(out.glob("*.safetensors"))


def test_lora_for_another_family_is_refused(capsys, tmp_path, subject_dir, tiny_pipeline_dirs):
    xl = tmp_path / "xl"
    assert main(TRAIN + ["--model", "tiny:sdxl", "--images", str(subject_dir), "--output", str(xl)]) == 0
    out_png = tmp_path / "img.png"
    err = _run_error(capsys, ["generate", "--model", str(tiny_pipeline_dirs["sd1"]), "--prompt", "a dog <lora:sks:1>",
                              "--artifacts", str(xl), "--steps", "2", "--output", str(out_png)])
    assert "sks" in err and "sd1" in err
    assert not out_png.exists()


def test_output_under_a_regular_file_is_refused(capsys, tmp_path, subject_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _run_error(capsys, TRAIN + ["--model", "tiny:sd1", "--images", str(subject_dir),
                                      "--output", str(blocker / "out")])
    assert "file" in err


def test_config_file_flags_override_and_resolved_config_is_saved(tmp_path, subject_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 3\n  lr: 0.001\nlora:\n  rank: 2\n  alpha: 1\n")
    out = tmp_path / "out"
    assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks",
                 "--config", str(config), "--steps", "2", "--output", str(out), "--quiet", "--log-dir", "none"]) == 0
    resolved = json.loads((out / "sks.config.json").read_text())
    assert resolved["TrainConfig"]["steps"] == 2  # flag beats file
    assert resolved["TrainConfig"]["lr"] == 0.001  # file beats default
    assert resolved["LoRAConfig"]["rank"] == 2
    assert main(["inspect", str(out / "sks.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "lora" in shown and "tiny:sd1" in shown and "final_loss" in shown


def test_unknown_config_key_is_named(capsys, tmp_path, subject_dir):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nstepz = 3\n")
    err = _run_error(capsys, TRAIN + ["--model", "tiny:sd1", "--images", str(subject_dir), "--config", str(config),
                                      "--output", str(tmp_path / "o")])
    assert "train.stepz" in err


def test_generate_many_writes_each_image_and_a_grid(tmp_path, tiny_pipeline_dirs):
    from PIL import Image

    out = tmp_path / "many.png"
    assert main(["generate", "--model", str(tiny_pipeline_dirs["sd1"]), "--prompt", "a dog", "-n", "3",
                 "--steps", "2", "--output", str(out)]) == 0
    singles = [tmp_path / f"many-{i}.png" for i in range(3)]
    assert all(p.is_file() for p in singles)
    assert Image.open(out).size == (64, 64)  # 2x2 grid of 32 px images
    first = Image.open(singles[0])
    assert first.size == (32, 32)


def test_convert_without_model_uses_the_base_model_its_run_card_names(tmp_path, subject_dir):
    # tiny:sd1's widths are no family's standard ones: by family alone the layer names would not resolve.
    out = tmp_path / "out"
    assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks",
                 "--steps", "1", "--quiet", "--log-dir", "none", "--output", str(out)]) == 0
    converted = tmp_path / "sks-diffusers.safetensors"
    assert main(["convert", str(out / "sks.safetensors"), str(converted), "--to", "diffusers"]) == 0
    back = tmp_path / "sks-kohya.safetensors"
    assert main(["convert", str(converted), str(back), "--to", "kohya"]) == 0
    from safetensors.torch import load_file

    original, returned = load_file(out / "sks.safetensors"), load_file(back)
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)


def test_a_misspelled_embedding_word_is_refused_instead_of_read_as_text(tmp_path, capsys):
    argv = ["generate", "--model", "tiny:sd1", "--steps", "1", "--artifacts", str(tmp_path),
            "--output", str(tmp_path / "x.png"), "--prompt"]
    err = _run_error(capsys, [*argv, "a <skss-1> square"])
    assert "<skss-1>" in err and str(tmp_path) in err and not (tmp_path / "x.png").exists()
    assert main([*argv, "a <|endoftext|> square"]) == 0  # a word the tokenizer holds is no misspelling


def test_output_piped_into_a_closed_reader_ends_quietly(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    artifact = tmp_path / "a.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(200)}, artifact)
    child = subprocess.Popen([sys.executable, "-m", "sdtune.cli", "inspect", str(artifact)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # like `| head` exiting before sdtune writes
    err = child.stderr.read().decode()
    assert child.wait() == 141 and "Traceback" not in err and err == "", err
