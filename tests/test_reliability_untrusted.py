"""Untrusted files: every pickle sdtune reads goes through torch.load(weights_only=True), so a file whose
unpickling would run code is refused and nothing runs; absurd safetensors headers and hypernetwork entries
are refused before memory is allocated for them."""

from __future__ import annotations

import json
import pickle
import resource
import struct

import pytest
import torch

from sdtune.artifacts import load_artifact
from sdtune.inspection import describe_artifact
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.formats.embeddings import file_names

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on pickle protocols and TorchScript
TRAIN = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--steps", "2", "--checkpoint-every", "1",
         "--quiet", "--log-dir", "none"]


class _Payload:
    """Unpickled without weights_only, this creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
@pytest.mark.parametrize("container", ["torch-zip", "bare-pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, suffix, container):
    marker, path = tmp_path / "code-ran", tmp_path / f"evil{suffix}"
    payload = {"string_to_param": {"*": torch.zeros(1, 32)}, "name": _Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    for read in (load_artifact, describe_artifact):
        with pytest.raises(SdtuneError, match=f"evil\\{suffix}"):
            read(path)
    assert file_names(path) == ["evil"]  # generate's embedding scan names it without loading it
    assert not marker.exists()


def test_a_torchscript_archive_is_refused_without_loading_its_code(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(SdtuneError, match=r"scripted\.pt .*(code|not a readable torch file)"):
        load_artifact(path)


@pytest.mark.parametrize("state_file", ["optimizer.pt", "ema.pt"])
def test_a_checkpoint_whose_state_carries_code_is_refused_on_resume(tmp_path, subject_dir, capsys, state_file):
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    argv = TRAIN + ["--images", str(subject_dir), "--output", str(out), "--ema-decay", "0.5"]
    assert main(argv) == 0
    checkpoint = out / "checkpoints" / "step-000001"
    torch.save({"optimizer": {}, "x": _Payload(marker)}, checkpoint / state_file)
    assert main(argv + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"{state_file} may contain code" in err and "Traceback" not in err
    assert not marker.exists()


def _peak_rss_growth(action) -> int:
    """Bytes by which this process's peak resident memory grew while `action` ran."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    action()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def test_absurd_safetensors_sizes_and_offsets_are_refused_before_allocating(tmp_path):
    huge = {"w": {"dtype": "F32", "shape": [2**31], "data_offsets": [0, 2**33]}}  # an 8 GiB tensor, 12 bytes of data
    for name, length, header in [("length", 2**62, {}), ("offsets", None, huge),
                                 ("overflow", None, {"w": {"dtype": "F32", "shape": [2**40, 2**40],
                                                           "data_offsets": [0, 12]}})]:
        raw = json.dumps(header).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * 12)

        def load():
            with pytest.raises(SdtuneError, match=f"{name}\\.safetensors is not a readable safetensors file"):
                load_artifact(path)

        assert _peak_rss_growth(load) < 64 << 20, name


def test_hypernetwork_entries_describing_huge_layers_cost_no_memory(tmp_path):
    from sdtune.formats.hypernetwork import from_a1111
    from sdtune.hypernet_modules import HypernetworkNet

    side = {"linear.0.weight": torch.zeros(128, 64), "linear.0.bias": torch.zeros(128),
            "linear.1.weight": torch.zeros(64, 128), "linear.1.bias": torch.zeros(64)}
    # 1 GB of layers if they were built: 64 -> 960,000 -> 64 wide, for k and v
    hf = from_a1111({64: (side, dict(side)), "layer_structure": [1, 15_000, 1]})

    def build():
        with pytest.raises(SdtuneError, match="do not fit the layer sequence"):
            HypernetworkNet.from_file(hf)

    assert _peak_rss_growth(build) < 64 << 20
