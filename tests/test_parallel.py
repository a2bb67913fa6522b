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


def test_bench_sharding_tabulates_the_trained_state_per_process(capsys):
    assert main(["bench", "sharding", "--model", "tiny:sd1", "--method", "dreambooth,lora", "--json"]) == 0
    import json

    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    dreambooth, lora = rows["dreambooth"], rows["lora"]
    assert dreambooth["engine"] == "fsdp" and lora["engine"] == "ddp"
    whole = dreambooth["trainable_params"] * 16  # value, gradient and two AdamW moments, fp32
    assert [dreambooth["per_process"][n] for n in ("1", "2", "8")] == [whole, whole // 2, whole // 8]
    assert len(set(lora["per_process"].values())) == 1  # every ddp process holds all of it
    assert 0 < dreambooth["largest_unit"] < dreambooth["trainable_params"]
