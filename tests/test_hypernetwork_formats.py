"""Hypernetwork files: hand-built A1111 .pt files load into the right layer sequences and compute what A1111
computes; both file forms round-trip bit-exactly; pickles that carry code are refused unexecuted."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from hypernetwork_reference import build_file, expected_types, reference_forward
from sdtune.artifacts import load_artifact
from sdtune.inspection import describe_artifact
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.formats import hypernetwork as fmt
from sdtune.hypernet_modules import HypernetworkNet as Net
from sdtune.methods.hypernetwork import HypernetworkConfig, structure_of, write_file

WIDTHS = [32, 64]
FULL = {"step": 120, "name": "case", "sd_checkpoint": "0123456789", "sd_checkpoint_name": "model.ckpt",
        "weight_initialization": "Normal", "optional_info": None}

# name -> (entries as A1111 stores them, the layer sequence A1111 builds from them (by hand), old keys?, dtype)
CASES = {
    "default_linear": (
        {**FULL, "layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
         "activate_output": False, "use_dropout": False, "dropout_structure": [0, 0, 0], "last_layer_dropout": False},
        [("linear", (1, 2)), ("linear", (2, 1))], False, torch.float32),
    "relu_norm_dropout": (
        {**FULL, "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
         "activate_output": False, "use_dropout": True, "dropout_structure": [0, 0.3, 0], "last_layer_dropout": True},
        [("linear", (1, 2)), ("act", "relu"), ("norm", None), ("drop", 0.3), ("linear", (2, 1)), ("norm", None)],
        False, torch.float32),
    "swish_deep_activate_output_fp16": (
        {**FULL, "layer_structure": [1, 1.5, 2, 1], "activation_func": "swish", "is_layer_norm": False,
         "activate_output": True, "use_dropout": True, "dropout_structure": [0, 0.1, 0.2, 0],
         "last_layer_dropout": True},
        [("linear", (1, 1.5)), ("act", "swish"), ("drop", 0.1), ("linear", (1.5, 2)), ("act", "swish"),
         ("drop", 0.2), ("linear", (2, 1)), ("act", "swish")], False, torch.float16),
    # No activate_output (means True) and no dropout_structure (legacy use_dropout pattern: 0.3 after hidden
    # layers but the last one, since last_layer_dropout is False).
    "leakyrelu_norm_legacy_dropout_no_activate_output": (
        {"layer_structure": [1, 2, 2, 1], "activation_func": "leakyrelu", "is_layer_norm": True,
         "use_dropout": True, "last_layer_dropout": False, "name": "legacy", "step": 7},
        [("linear", (1, 2)), ("act", "leakyrelu"), ("norm", None), ("drop", 0.3), ("linear", (2, 2)),
         ("act", "leakyrelu"), ("norm", None), ("linear", (2, 1)), ("act", "leakyrelu"), ("norm", None)],
        False, torch.float32),
    "torch_name_gelu": (
        {**FULL, "layer_structure": [1, 3, 1], "activation_func": "gelu", "is_layer_norm": False,
         "activate_output": False, "use_dropout": False, "dropout_structure": [0, 0, 0], "last_layer_dropout": False},
        [("linear", (1, 3)), ("act", "gelu"), ("linear", (3, 1))], False, torch.float32),
    # The first hypernetworks: two Linears saved as linear1/linear2 and only a few entries.
    "old_linear1_linear2": (
        {"step": 3000, "name": "anime", "sd_checkpoint": "925997e9", "sd_checkpoint_name": "animefull-final-pruned"},
        [("linear", (1, 2)), ("linear", (2, 1))], True, torch.float32),
}


def _load(path: Path):
    obj, metadata = load_artifact(path)  # .pt: torch.load(weights_only=True) only
    return fmt.read(obj, metadata, path.name)


@pytest.mark.parametrize("case", CASES)
def test_a1111_file_builds_its_exact_layer_sequence_and_output(tmp_path, case):
    entries, spec, old, dtype = CASES[case]
    path = tmp_path / f"{case}.pt"
    states = build_file(path, WIDTHS, entries, spec, seed=len(case), old=old, dtype=dtype)
    hf = _load(path)
    assert hf.widths == WIDTHS and hf.entries == entries
    net = Net.from_file(hf).eval()
    x = torch.randn(2, 5, max(WIDTHS), generator=torch.Generator().manual_seed(1))
    for width in WIDTHS:
        for side in ("k", "v"):
            module = net.pair(width)[side]
            built = [(type(layer), getattr(layer, "p", None) if isinstance(layer, torch.nn.Dropout) else None)
                     for layer in module.linear]
            assert built == expected_types(spec)
            xs = x[..., :width]
            with torch.no_grad():
                ours = module(xs, 0.7)
            theirs = reference_forward(xs, spec, states[width][side], 0.7)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ours, xs)


def _safetensors_content(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data bytes): safetensors writes its metadata map in a random order, so a file's bytes
    differ run to run even for identical content; everything else is compared byte for byte."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", ["relu_norm_dropout", "swish_deep_activate_output_fp16", "old_linear1_linear2"])
def test_both_forms_round_trip_bit_exactly(tmp_path, case):
    entries, spec, old, dtype = CASES[case]
    genuine = tmp_path / "genuine.pt"
    build_file(genuine, WIDTHS, entries, spec, old=old, dtype=dtype)
    hf = _load(genuine)
    pt1 = write_file(hf, tmp_path / "1" / "hn.pt", "a1111")
    st1 = write_file(_load(pt1), tmp_path / "2" / "hn.safetensors", "sdtune")
    pt2 = write_file(_load(st1), tmp_path / "3" / "hn.pt", "a1111")
    st2 = write_file(_load(pt2), tmp_path / "4" / "hn.safetensors", "sdtune")
    assert pt1.read_bytes() == pt2.read_bytes()
    assert _safetensors_content(st1) == _safetensors_content(st2)
    again = _load(st2)
    _same_tensors(hf.tensors, again.tensors)
    assert again.entries == entries and list(again.entries) == list(entries)
    # What we write is still a file A1111 reads: a plain dict, int widths -> (k, v) state dicts, then entries.
    raw = torch.load(pt2, weights_only=True)
    assert [k for k in raw if isinstance(k, int)] == WIDTHS
    assert set(raw[32][0]) == {k.split(".", 2)[2] for k in hf.tensors if k.startswith("32.k.")}


def test_cli_convert_and_inspect(tmp_path):
    entries, spec, _, _ = CASES["relu_norm_dropout"]
    genuine = tmp_path / "hn.pt"
    build_file(genuine, WIDTHS, entries, spec)
    st, pt = tmp_path / "hn.safetensors", tmp_path / "back" / "hn.pt"
    assert main(["convert", str(genuine), str(st), "--to", "sdtune"]) == 0
    assert main(["convert", str(st), str(pt)]) == 0  # .pt output means the a1111 layout
    _same_tensors(_load(genuine).tensors, _load(pt).tensors)
    text = describe_artifact(st)
    for needle in ("hypernetwork_layer_structure: 1, 2, 1", "hypernetwork_widths: 32, 64",
                   "hypernetwork_activation: relu", "hypernetwork_layer_norm: True",
                   f"hypernetwork_param_count: {_load(genuine).param_count}"):
        assert needle in text
    assert "Hypernetwork (A1111 layout)" in describe_artifact(genuine)
    assert main(["convert", str(st), str(tmp_path / "x.safetensors"), "--to", "kohya"]) == 2


def _write_marker(path):
    Path(path).write_text("executed")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    entries, spec, _, _ = CASES["default_linear"]
    evil = tmp_path / "evil.pt"
    build_file(evil, WIDTHS, entries, spec)
    obj = torch.load(evil, weights_only=True)
    obj["optional_info"] = _Payload(str(marker))
    torch.save(obj, evil)
    with pytest.raises(SdtuneError, match="may contain code"):
        load_artifact(evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors"), "--to", "sdtune"]) == 2
    with open(tmp_path / "plain.pt", "wb") as f:  # a bare pickle (not a torch zip) too
        pickle.dump(_Payload(str(marker)), f, protocol=2)
    with pytest.raises(SdtuneError):
        load_artifact(tmp_path / "plain.pt")
    assert not marker.exists()


def test_bad_files_and_settings_are_refused_clearly(tmp_path):
    entries, spec, _, _ = CASES["relu_norm_dropout"]
    path = tmp_path / "hn.pt"
    build_file(path, WIDTHS, {**entries, "is_layer_norm": False}, spec)  # tensors of norms the entries deny
    with pytest.raises(SdtuneError, match="do not fit the layer sequence"):
        Net.from_file(_load(path))
    build_file(path, WIDTHS, {**entries, "activation_func": "nosuch"}, spec)
    with pytest.raises(SdtuneError, match="Unknown hypernetwork activation"):
        Net.from_file(_load(path))
    with pytest.raises(SdtuneError, match="start and end with 1"):
        structure_of(HypernetworkConfig(layer_structure="2,1"))
    with pytest.raises(SdtuneError, match="one value per entry"):
        structure_of(HypernetworkConfig(dropout="0,0.1"))
    with pytest.raises(SdtuneError, match="not a hypernetwork"):
        fmt.read({"string_to_param": {"*": torch.zeros(1, 4)}}, {}, "emb.pt")
    one_value = HypernetworkConfig(dropout="0.2", layer_structure="1,2,2,1")
    assert structure_of(one_value).dropout_structure == (0, 0.2, 0.2, 0)
