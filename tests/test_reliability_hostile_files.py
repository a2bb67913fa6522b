"""Hostile files in the folders sdtune reads: small pickles that claim huge tensors or explode when walked,
special files (FIFOs) named like artifacts, and hidden temp files of interrupted writes. Each is refused in
one line, or never looked at, before memory or time is spent on it."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtune.artifacts import flatten_tensors, load_artifact
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.fuzz_inputs import deep_pickle, laughs, torch_zip_with_pickle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
GENERATE = ["generate", "--model", "tiny:sd1", "--steps", "1"]
LORA_LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # a tiny:sd1 layer
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def _one_line_error(capsys, argv: list[str], name: str) -> str:
    """Run the CLI, expecting exit code 2 and one stderr line that names `name`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err, err
    return err


def _peak_rss_growth(action) -> int:
    """Bytes by which this process's peak resident memory grew while `action` ran."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    action()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


# Case 3: small safe pickles that claim huge tensors or explode ---------------------------------------------

def _stride0(*shape: int) -> torch.Tensor:
    """A view of 4 stored bytes that claims `shape` (torch.save keeps it that small)."""
    return torch.zeros(1).expand(*shape)


def test_a_stride0_tensor_is_refused_before_any_use(tmp_path):
    path = tmp_path / "dog.pt"
    torch.save({"string_to_param": {"*": _stride0(5_000_000, 768)}, "name": "dog"}, path)
    assert path.stat().st_size < 4096

    def load():
        with pytest.raises(SdtuneError, match=r"dog\.pt holds tensor 'string_to_param\.\*' of shape \[5000000, 768\]"):
            load_artifact(path)

    assert _peak_rss_growth(load) < 64 << 20


@pytest.mark.parametrize("kind", ["embedding", "hypernet", "lora"])
def test_generate_refuses_a_stride0_artifact_in_one_line(capsys, tmp_path, kind):
    folder, out = tmp_path / "art", tmp_path / "out.png"
    folder.mkdir()
    objects = {  # each fits tiny:sd1 by shape, so only the stride check can refuse it
        "embedding": ("dog.pt", "a photo of a dog", {"string_to_param": {"*": _stride0(2, 32)}, "name": "dog"}),
        "hypernet": ("hn.pt", "a dog <hypernet:hn:1>",
                     {32: ({"linear.0.weight": _stride0(32, 32), "linear.0.bias": torch.zeros(32)},) * 2,
                      "layer_structure": [1, 1], "activation_func": "linear"}),
        "lora": ("lo.pt", "a dog <lora:lo:1>", {f"{LORA_LAYER}.lora_down.weight": _stride0(1, 32),
                                                 f"{LORA_LAYER}.lora_up.weight": torch.zeros(32, 1)}),
    }
    name, prompt, obj = objects[kind]
    torch.save(obj, folder / name)
    _one_line_error(capsys, GENERATE + ["--prompt", prompt, "--artifacts", str(folder), "--output", str(out)], name)
    assert not out.exists()


def test_an_embedding_with_more_vectors_than_a_prompt_chunk_is_refused(capsys, tmp_path):
    folder, out = tmp_path / "art", tmp_path / "out.png"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(76, 32)}, "name": "dog"}, folder / "dog.pt")
    err = _one_line_error(capsys, GENERATE + ["--prompt", "a photo of a dog", "--artifacts", str(folder),
                                              "--output", str(out)], "'dog'")
    assert "76 vectors" in err and "75" in err
    assert not out.exists()


def test_generate_names_each_artifact_file_a_prompt_activated(capsys, tmp_path):
    folder, out = tmp_path / "art", tmp_path / "out.png"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "dog"}, folder / "dog.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "cat"}, folder / "cat.pt")
    lora = {f"{LORA_LAYER}.lora_down.weight": torch.zeros(1, 32), f"{LORA_LAYER}.lora_up.weight": torch.zeros(32, 1)}
    torch.save(lora, folder / "lo.pt")
    assert main(GENERATE + ["--prompt", "a photo of a dog <lora:lo:0.5>", "--artifacts", str(folder),
                            "--output", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"using lora lo (weight 0.5) from {folder / 'lo.pt'}",
                   f"using embedding dog (1 vector) from {folder / 'dog.pt'}"]


def test_a_pickle_length_field_claiming_petabytes_is_refused_unallocated(tmp_path):
    path = tmp_path / "claim.pt"
    path.write_bytes(b"\x96" + (2**56).to_bytes(8, "little"))  # BYTEARRAY8 of 2**56 bytes, none present

    def load():
        with pytest.raises(SdtuneError, match=r"claim\.pt is not a readable torch file"):
            load_artifact(path)

    assert _peak_rss_growth(load) < 64 << 20


def test_a_billion_laughs_pickle_is_refused_before_unpickling(tmp_path):
    path = tmp_path / "laughs.pt"
    torch.save(laughs(64), path)
    assert path.stat().st_size < 4096
    with pytest.raises(SdtuneError, match=r"laughs\.pt expands to over .* entries"):
        load_artifact(path)


@pytest.mark.parametrize("builder", ["laughs", "deep"])
def test_inspect_refuses_an_exploding_or_deep_pickle_in_one_line(capsys, tmp_path, builder):
    path = tmp_path / f"{builder}.pt"
    if builder == "laughs":
        torch.save(laughs(21), path)  # 2 M paths: enough to refuse, few enough to finish without the bound
    else:  # 5000 nested lists: torch.save cannot write it (recursion), so the pickle is written by hand
        path.write_bytes(torch_zip_with_pickle(deep_pickle(5000)))
    err = _one_line_error(capsys, ["inspect", str(path)], path.name)
    assert "expands to over" in err or "levels deep" in err


def test_flatten_tensors_is_bounded_for_objects_built_in_memory():
    for obj in (laughs(21), [torch.zeros(1)] * 2_000_000):
        with pytest.raises(SdtuneError, match="expands to over"):
            flatten_tensors(obj)
    cycle: list = [torch.zeros(1)]
    cycle.append(cycle)
    with pytest.raises(SdtuneError):
        flatten_tensors(cycle)


def test_the_ui_library_lists_good_artifacts_beside_an_exploding_one(tmp_path):
    from sdtune.ui.library import scan

    torch.save(laughs(21), tmp_path / "bad.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "good"}, tmp_path / "good.pt")
    entries = {e.path.name: e for e in scan([tmp_path])}
    assert entries["good.pt"].kind == "textual-inversion"
    assert entries["bad.pt"].layout.startswith("unreadable") and "expands to over" in entries["bad.pt"].layout


def test_a_safetensors_header_claiming_a_huge_tensor_is_refused_unread(capsys, tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    err = _one_line_error(capsys, ["inspect", str(path)], "big.safetensors")
    assert "not a readable safetensors file" in err
    assert _peak_rss_growth(lambda: pytest.raises(SdtuneError, load_artifact, path)) < 64 << 20


# Case 4: special files named like artifacts or images --------------------------------------------------------

@needs_fifo
def test_scans_never_list_a_fifo_named_like_an_artifact(tmp_path):
    from sdtune.generate import _artifact_files
    from sdtune.prompt import artifact_candidates
    from sdtune.ui.library import scan

    (tmp_path / "deep").mkdir()
    os.mkfifo(tmp_path / "sks.safetensors")
    os.mkfifo(tmp_path / "deep" / "dog.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "cat"}, tmp_path / "cat.pt")
    assert artifact_candidates(tmp_path, (".safetensors", ".pt")) == [tmp_path / "cat.pt"]
    assert _artifact_files([tmp_path], (".safetensors", ".pt", ".bin")) == [tmp_path / "cat.pt"]
    assert [e.path for e in scan([tmp_path])] == [tmp_path / "cat.pt"]


@needs_fifo
def test_inspect_of_a_fifo_says_what_it_is_without_opening_it(capsys, tmp_path):
    os.mkfifo(tmp_path / "sks.safetensors")
    err = _one_line_error(capsys, ["inspect", str(tmp_path / "sks.safetensors")], "sks.safetensors")
    assert "pipe, device or socket" in err


@needs_fifo
def test_generate_runs_beside_a_fifo_in_the_artifacts_folder(tmp_path):
    """In a child process, so that a read that blocks on the FIFO fails this test instead of hanging the suite."""
    os.mkfifo(tmp_path / "sks.safetensors")
    out = tmp_path / "out.png"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "sdtune.cli", *GENERATE, "--prompt", "a photo of sks",
                           "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file()


@needs_fifo
def test_image_and_caption_fifos_are_skipped(tmp_path, subject_dir):
    from sdtune.class_images import _image_files
    from sdtune.data import load_image_folder

    os.mkfifo(subject_dir / "zz.png")
    os.mkfifo(subject_dir / "subject_0.txt")
    records = load_image_folder(subject_dir)
    assert [r.path.name for r in records] == [f"subject_{i}.png" for i in range(4)]
    assert records[0].caption is None
    assert [p.name for p in _image_files(subject_dir)] == [f"subject_{i}.png" for i in range(4)]


def test_a_symlink_loop_is_walked_once(tmp_path):
    from sdtune.prompt import artifact_candidates

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.pt").write_bytes(b"")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)
    (tmp_path / "again").symlink_to(tmp_path / "a")
    assert artifact_candidates(tmp_path, (".pt",)) == [tmp_path / "a" / "x.pt"]


def test_a_scan_past_its_entry_limit_is_refused_in_one_sentence(tmp_path):
    from sdtune.scan import regular_files

    for i in range(5):
        (tmp_path / f"{i}.pt").write_bytes(b"")
    assert len(regular_files(tmp_path, (".pt",), limit=5)) == 5
    with pytest.raises(SdtuneError, match="more than 4 files and folders"):
        regular_files(tmp_path, (".pt",), limit=4)


# Case 5: the hidden temp file of a killed .pt write ---------------------------------------------------------

def test_a_hidden_temp_file_of_a_killed_write_is_never_loaded(capsys, tmp_path):
    folder, out = tmp_path / "art", tmp_path / "out.png"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "tokq"}, folder / "tokq.pt")
    # what a kill between torch.save and the rename leaves: a complete file under the temp name
    stale = {"string_to_param": {"*": torch.ones(2, 32)}, "name": "tokq", "sdtune": {"textual-inversion_token": "tokq"}}
    torch.save(stale, folder / ".tokq.1a2b3c4d.tmp.pt")
    assert main(GENERATE + ["--prompt", "a photo of tokq", "--artifacts", str(folder), "--output", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"using embedding tokq (1 vector) from {folder / 'tokq.pt'}"]
