"""Where commands write: never outside --output, never over what sdtune did not make, one run per folder,
all-or-nothing multi-file outputs, no leftovers from failed or killed runs (the hostile-input pass's cases 1, 2,
6 and 9)."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune.cli import main

MADE_FILE, LOCK_FILE = ".sdtune-made.json", ".sdtune.lock"  # what an output folder holds besides outputs

TRAIN = ["--model", "tiny:sd1", "--token", "sks", "--class-word", "dog", "--steps", "1", "--quiet",
         "--log-dir", "none", "--resolution", "32"]


def _train(method: str, images: Path, output: Path, *extra: str) -> list[str]:
    return ["train", method, *TRAIN, "--images", str(images), "--output", str(output), *extra]


def _refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run argv; it must exit 2 with one stderr line holding every fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dreambooth_never_replaces_the_training_images_folder(tmp_path, subject_dir, capsys):
    # The common layout: data/sks holds the images and data is the output folder.
    data = tmp_path / "data"
    images = data / "sks"
    images.mkdir(parents=True)
    for p in subject_dir.iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "notes.txt").write_text("mine")
    before = _snapshot(data)
    _refused(capsys, _train("dreambooth", images, data), str(images), "did not write it")
    assert _snapshot(data) == before


@pytest.mark.parametrize("name, why", [(".", "is . or .."), ("..", "is . or .."), ("../victim", "separator"),
                                       ("../../x", "separator"), ("/abs", "separator"), ("checkpoints", "folders"),
                                       (".hidden", "dot"), ("a" * 240, "longer"), ("a\x1bb", "control")])
def test_names_that_leave_the_output_folder_are_refused_before_any_write(tmp_path, subject_dir, capsys, name, why):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    out = tmp_path / "deep" / "out"
    for method in ("dreambooth", "lora"):
        _refused(capsys, _train(method, subject_dir, out, "--name", name), why)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subject", "victim"]  # not even the output folder
    assert (victim / "keep.txt").read_text() == "keep" and [p.name for p in victim.iterdir()] == ["keep.txt"]


def test_a_file_sdtune_did_not_make_is_never_replaced_but_its_own_are(tmp_path, subject_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "sks.safetensors"
    save_file({"w": torch.ones(3)}, theirs, metadata={"ss_network_dim": "4"})  # a downloaded LoRA
    before = theirs.read_bytes()
    _refused(capsys, _train("lora", subject_dir, out), str(theirs), "did not write it")
    assert theirs.read_bytes() == before
    theirs.unlink()

    assert main(_train("lora", subject_dir, out)) == 0  # sdtune's own file: a rerun replaces it
    first = (out / "sks.safetensors").stat().st_mtime_ns
    assert main(_train("lora", subject_dir, out, "--seed", "1")) == 0
    assert (out / "sks.safetensors").stat().st_mtime_ns != first


def test_artifacts_written_before_the_record_existed_are_still_replaced(tmp_path, subject_dir):
    out = tmp_path / "out"
    assert main(_train("lora", subject_dir, out)) == 0
    (out / MADE_FILE).unlink(missing_ok=True)  # an output folder from an earlier sdtune version: no record
    assert main(_train("lora", subject_dir, out, "--seed", "1")) == 0


def test_a_folder_where_the_config_goes_fails_before_training_and_keeps_the_artifact(tmp_path, subject_dir, capsys):
    out = tmp_path / "out"
    assert main(_train("lora", subject_dir, out)) == 0
    before = (out / "sks.safetensors").read_bytes()
    (out / "sks.config.json").unlink()
    (out / "sks.config.json").mkdir()
    _refused(capsys, _train("lora", subject_dir, out, "--seed", "3"), "sks.config.json", "in the way")
    assert (out / "sks.safetensors").read_bytes() == before


def test_a_log_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, subject_dir, capsys):
    log = tmp_path / "log.txt"
    log.write_text("x")
    out = tmp_path / "out"
    argv = [a for a in _train("lora", subject_dir, out) if a not in ("--log-dir", "none")] + ["--log-dir", str(log)]
    _refused(capsys, argv, str(log), "is a file")
    assert not out.exists()


def test_a_second_run_into_a_held_folder_is_refused_and_a_dead_runs_lock_is_not(tmp_path, subject_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"4242")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _refused(capsys, _train("lora", subject_dir, out), "Another sdtune run (process 4242)", str(out))
        assert not (out / "sks.safetensors").exists()
    finally:
        os.close(fd)  # the holder dies: its lock file stays, its lock does not
    assert (out / LOCK_FILE).exists()
    assert main(_train("lora", subject_dir, out)) == 0
    assert not (out / LOCK_FILE).exists()


def test_a_failed_run_leaves_no_output_folder_and_stale_temp_files_are_swept(tmp_path, subject_dir, capsys):
    out = tmp_path / "out"
    _refused(capsys, _train("lora", subject_dir, out, "--lora-targets", "no_such_layer"), "no_such_layer")
    assert not out.exists()

    out.mkdir()
    stale = [out / ".sks.safetensors.0123abcd.tmp", out / ".sks.config.json.0123abcd.tmp.json"]
    for path in stale:
        path.write_bytes(b"half")
    (out / ".users-own-hidden-file").write_text("keep")
    assert main(_train("lora", subject_dir, out)) == 0
    assert not any(p.exists() for p in stale)
    assert (out / ".users-own-hidden-file").read_text() == "keep"


def test_artifacts_get_the_umask_mode_like_every_other_file(tmp_path, subject_dir):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(_train("lora", subject_dir, out)) == 0
    finally:
        os.umask(old)
    for path in (out / "sks.safetensors", out / "sks.config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_generate_checks_every_image_path_first_and_writes_all_or_none(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.png"
    for i in range(2):
        (tmp_path / f"g-{i}.png").write_bytes(b"old")
    (tmp_path / "g-2.png").mkdir()
    argv = ["generate", "--model", "tiny:sd1", "--steps", "1", "--prompt", "a dog", "-n", "3", "--output", str(out)]
    _refused(capsys, argv, "g-2.png")
    assert [(tmp_path / f"g-{i}.png").read_bytes() for i in range(2)] == [b"old", b"old"]
    (tmp_path / "g-2.png").rmdir()

    from PIL import Image

    real_save, calls = Image.Image.save, []

    def full_disk_on_the_third(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_on_the_third)
    _refused(capsys, argv, "disk is full")
    assert [(tmp_path / f"g-{i}.png").read_bytes() for i in range(2)] == [b"old", b"old"]
    assert not out.exists() and not (tmp_path / "g-2.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_ui_refuses_names_that_leave_its_workspace_and_replaces_links_instead_of_writing_through(tmp_path,
                                                                                                     subject_dir):
    from sdtune.errors import SdtuneError
    from sdtune.ui.state import ModelSource, copy_into
    from sdtune.ui.training import TrainRequest, TrainingRunner

    runs = tmp_path / "ws" / "runs"
    runner = TrainingRunner(ModelSource("tiny:sd1"), runs)
    for name in ("../../../x", str(tmp_path / "abs"), ".."):
        request = TrainRequest(method="lora", images=str(subject_dir), token="sks", class_word="dog", name=name,
                               train={"steps": 1, "log_dir": "none"})
        with pytest.raises(SdtuneError, match="Name"):
            runner.start(request)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "abs").exists()

    uploads = tmp_path / "ws" / "uploads"
    uploads.mkdir(parents=True)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not yours")
    (uploads / "evil.safetensors").symlink_to(outside)
    upload = tmp_path / "incoming" / "evil.safetensors"
    upload.parent.mkdir()
    upload.write_bytes(b"uploaded")
    copy_into(upload, uploads)
    assert outside.read_bytes() == b"not yours"
    assert not (uploads / "evil.safetensors").is_symlink()
    assert (uploads / "evil.safetensors").read_bytes() == b"uploaded"


def test_bench_output_at_a_file_is_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    from sdtune import model

    target = tmp_path / "results.txt"
    target.write_text("mine")
    monkeypatch.setattr(model, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    _refused(capsys, ["bench", "--model", "tiny:sd1", "--steps", "1", "--warmup", "1", "--output", str(target)],
             str(target), "is a file")
    assert target.read_text() == "mine"
