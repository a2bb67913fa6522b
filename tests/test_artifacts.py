"""Atomic writes, safe loading, hashes and `inspect` output of sdtune artifacts."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import torch as st

from sdtune import __version__, artifacts
from sdtune.artifacts import (
    atomic_output_dir,
    file_hash,
    flatten_tensors,
    load_artifact,
    model_hash,
    run_card,
    save_artifact,
)
from sdtune.errors import SdtuneError
from sdtune.inspection import describe_artifact


def _tensors():
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "h": torch.ones(2, dtype=torch.bfloat16)}


def test_run_card_encodes_non_strings():
    card = run_card(method="lora", steps=100, seed=0, training_config={"lr": 1e-4, "rank": 4}, peak_memory=None)
    assert card["method"] == "lora" and card["sdtune_version"] == __version__
    assert json.loads(card["training_config"]) == {"lr": 1e-4, "rank": 4}
    assert card["steps"] == "100" and card["peak_memory"] == "null"
    assert all(isinstance(v, str) for v in card.values())


def test_save_and_load_round_trip(tmp_path):
    path = save_artifact(tmp_path / "sub" / "a.safetensors", _tensors(), run_card(method="ti"))
    tensors, metadata = load_artifact(path)
    assert metadata["method"] == "ti"
    for k, v in _tensors().items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v)
    assert os.listdir(path.parent) == ["a.safetensors"]  # no temp file left behind


def test_identical_saves_give_identical_bytes(tmp_path):
    """Same tensors and run card, same file: safetensors alone orders metadata keys by hash, per save."""
    card = {**run_card(method="lora", steps=10, note="naïve ü \"quoted\""), **{f"key{i}": str(i) for i in range(12)}}
    blobs = {save_artifact(tmp_path / f"{i}.safetensors", _tensors(), card).read_bytes() for i in range(6)}
    assert len(blobs) == 1
    tensors, metadata = load_artifact(tmp_path / "0.safetensors")
    assert metadata == card
    assert torch.equal(tensors["w"], _tensors()["w"])


def test_shared_storage_tensors_are_saved(tmp_path):
    base = torch.randn(4, 4)
    tensors, _ = load_artifact(save_artifact(tmp_path / "s.safetensors", {"a": base, "b": base, "c": base[0]}, {}))
    assert torch.equal(tensors["b"], base) and torch.equal(tensors["c"], base[0])


def test_metadata_values_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="run_card"):
        save_artifact(tmp_path / "a.safetensors", _tensors(), {"steps": 3})


def _enospc_after_partial_write(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_enospc_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch, existing):
    path = tmp_path / "a.safetensors"
    if existing:
        save_artifact(path, {"old": torch.zeros(1)}, {"v": "old"})
        before = path.read_bytes()
    monkeypatch.setattr(artifacts.st, "save_file", _enospc_after_partial_write)
    with pytest.raises(SdtuneError, match=r"a\.safetensors.*disk is full"):
        save_artifact(path, _tensors(), {})
    assert os.listdir(tmp_path) == (["a.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_enospc_at_fsync_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", no_space)
    with pytest.raises(SdtuneError, match="disk is full"):
        save_artifact(tmp_path / "a.safetensors", _tensors(), {})
    assert os.listdir(tmp_path) == []


def test_output_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SdtuneError, match=r"file\.txt/out/a\.safetensors.*is a file, not a folder"):
        save_artifact(blocker / "out" / "a.safetensors", _tensors(), {})
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_wrong_extension_is_refused(tmp_path):
    with pytest.raises(SdtuneError, match=r"\.safetensors"):
        save_artifact(tmp_path / "a.pt", _tensors(), {})


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "pipe"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.json").write_text("{}")
            raise RuntimeError("crash mid-save")
    assert os.listdir(tmp_path) == []
    with atomic_output_dir(target) as tmp:
        (tmp / "model.json").write_text("1")
    assert os.listdir(target) == ["model.json"]
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            raise RuntimeError("second run fails")
    assert (target / "model.json").read_text() == "1" and os.listdir(tmp_path) == ["pipe"]
    with atomic_output_dir(target) as tmp:
        (tmp / "model.json").write_text("2")
    assert (target / "model.json").read_text() == "2" and os.listdir(tmp_path) == ["pipe"]


def test_truncated_safetensors_is_refused_by_name(tmp_path):
    path = save_artifact(tmp_path / "good.safetensors", _tensors(), {})
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SdtuneError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_artifact(bad)
    with pytest.raises(SdtuneError, match=r"cut\.safetensors"):
        describe_artifact(bad)


class _Payload:
    """A pickle that would run code (a call to print) when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(SdtuneError, match=r"evil\.pt may contain code .*was not loaded"):
        load_artifact(path)
    assert "must never run" not in capsys.readouterr().out


def test_plain_pickle_loads_and_flattens(tmp_path):
    path = tmp_path / "hn.pt"
    layers = [{"linear.0.weight": torch.ones(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)}]
    obj = {768: layers, "name": "hn", "step": 5}
    torch.save(obj, path)
    loaded, metadata = load_artifact(path)
    assert metadata == {} and loaded["name"] == "hn" and loaded["step"] == 5
    flat = flatten_tensors(loaded)
    assert set(flat) == {"768.0.linear.0.weight", "768.1.linear.0.weight"}
    assert "Hypernetwork" in describe_artifact(path)


def test_unknown_or_missing_files_are_refused(tmp_path):
    with pytest.raises(SdtuneError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"1")
    with pytest.raises(SdtuneError, match="unknown extension"):
        load_artifact(tmp_path / "x.onnx")
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    with pytest.raises(SdtuneError, match=r"bad\.ckpt"):
        load_artifact(tmp_path / "bad.ckpt")


def test_hashes(tmp_path):
    path = save_artifact(tmp_path / "a.safetensors", _tensors(), {})
    import hashlib

    assert file_hash(path, chunk_bytes=7) == hashlib.sha256(path.read_bytes()).hexdigest()
    h = model_hash(_tensors())
    assert len(h) == 10 and h == model_hash(dict(reversed(list(_tensors().items()))))
    changed = _tensors()
    changed["w"][0, 0] += 1
    assert model_hash(changed) != h
    module = torch.nn.Linear(2, 2)
    assert model_hash(module) == model_hash(module.state_dict())


def test_describe_artifact(tmp_path):
    card = run_card(method="lora", base_family="sd1", steps=10, training_config={"rank": 4, "alpha": 8})
    path = save_artifact(tmp_path / "a.safetensors", _tensors(), card)
    text = describe_artifact(path)
    assert "format:     sdtune lora artifact" in text
    assert "tensors:    2" in text and "parameters: 14" in text and "bytes:      52" in text
    assert "float32 x1" in text and "bfloat16 x1" in text
    assert '"rank": 4' in text and "base_family: sd1" in text


def test_save_file_is_monkeypatchable_target():
    # the atomic writer goes through the module attribute the ENOSPC tests patch
    assert artifacts.st is st
