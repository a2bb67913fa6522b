"""--distributed refuses in one line what makes no sense, before any training step (no torchrun needed)."""

from __future__ import annotations

import pytest

from sdtune.cli import main


@pytest.mark.parametrize("method, extra, words", [
    ("lora", [], "--distributed fsdp shards full fine-tunes (dreambooth); lora trains few enough values"),
    ("dreambooth", ["--validation-every", "2"], "cannot be combined with --validation-every"),
    ("dreambooth", [], "--distributed fsdp needs several processes; launch with torchrun"),
])
def test_distributed_fsdp_refuses_what_makes_no_sense_in_one_line(tmp_path, subject_dir, capsys, method, extra,
                                                                  words):
    code = main(["train", method, "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "2", "--quiet",
                 "--log-dir", "none", "--distributed", "fsdp", "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and words in err[0], err
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_one_process_records_that_nothing_was_shared(tmp_path, subject_dir):
    from sdtune.artifacts import load_artifact

    assert main(["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--steps", "1", "--quiet",
                 "--log-dir", "none", "--format", "sdtune", "--output", str(tmp_path)]) == 0
    tensors, card = load_artifact(tmp_path / "sks.safetensors")
    assert card["distributed"] == "single"
    # the trained values, their gradients and AdamW's two moments: four fp32 copies (plus step counters)
    trained = sum(t.numel() * 4 for key, t in tensors.items() if not key.endswith(".alpha"))
    assert 4 * trained <= int(card["trainable_state_bytes"]) <= 4 * trained + 8 * len(tensors)
