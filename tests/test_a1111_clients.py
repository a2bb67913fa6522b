"""Files and images as AUTOMATIC1111 reads them: every .pt sdtune writes passes A1111's safety check and its
Textual Inversion / hypernetwork loading path with no flags (tests/a1111_reference.py re-implements them from
A1111's code), the word A1111 knows an embedding by is the one the run names, and generated images carry
A1111's "parameters" text. Golden files from the torch.save writer keep loading."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from a1111_reference import (check_pt, load_embedding, load_hypernetwork, parse_generation_parameters,
                             read_info_from_image)
from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.formats.a1111_pickle import pt_bytes
from sdtune.formats.embeddings import read_embedding
from sdtune.formats.hypernetwork import read as read_hypernetwork
from sdtune.generate import A1111_SAMPLERS, SCHEDULERS
from sdtune.hypernet_modules import HypernetworkNet
from sdtune.infotext import model_identity
from sdtune.methods.hypernetwork import Hypernetwork
from sdtune.model import load

GOLDEN = Path(__file__).parent / "golden" / "a1111-pt-torch-save"  # written by sdtune 0.1.0 with torch.save
RELEASES = ("1.0", "1.7")  # A1111's zip allow-list before and since 1.7


def _train(method: str, family: str, images: Path, out: Path, capsys, *flags: str) -> tuple[Path, list[str]]:
    """One CLI training step on a tiny model: (the artifact, the lines the run printed to stderr)."""
    capsys.readouterr()
    assert main(["train", method, "--model", f"tiny:{family}", "--images", str(images), "--steps", "1",
                 "--log-dir", "none", "--output", str(out), *flags]) == 0
    captured = capsys.readouterr()
    return Path(captured.out.strip().splitlines()[-1]), captured.err.strip().splitlines()


def _convert(src: Path, dst: Path, capsys) -> Path:
    assert main(["convert", str(src), str(dst)] + ([] if dst.suffix == ".pt" else ["--to", "sdtune"])) == 0
    capsys.readouterr()
    return dst


def _content(path: Path):
    """A .pt's entries and tensors (dtype and values), independent of the order of dict entries."""
    def plain(x):
        if isinstance(x, torch.Tensor):
            return str(x.dtype), x.float().tolist()
        if isinstance(x, dict):
            return sorted((repr(k), plain(v)) for k, v in x.items())
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return plain(torch.load(path, weights_only=True))


def _widths(family: str) -> int:
    """The width A1111 checks an embedding against: the text encoders' hidden sizes, summed on SDXL."""
    return sum(encoder.config.hidden_size for encoder in load(f"tiny:{family}").text_encoders)


def _assert_a1111_embedding(path: Path, family: str, word: str) -> None:
    for release in RELEASES:
        check_pt(path, release)
    name, vec, _ = load_embedding(path, _widths(family))
    assert name == word
    obj, meta = load_artifact(path)
    ours = read_embedding(obj, meta, path.stem).vectors
    theirs = vec if isinstance(vec, dict) else {"clip_l": vec}
    mine = {"clip_l": ours["text_encoder"], **({"clip_g": ours["text_encoder_2"]} if family == "sdxl" else {})}
    assert theirs.keys() == mine.keys()
    for key in mine:
        assert torch.equal(theirs[key], mine[key].float()), key


def _assert_a1111_hypernetwork(path: Path) -> None:
    for release in RELEASES:
        check_pt(path, release)
    _, layers = load_hypernetwork(path)
    obj, meta = load_artifact(path)
    hf = read_hypernetwork(obj, meta, path.name)
    net = HypernetworkNet.from_file(hf).eval()
    assert sorted(layers) == sorted(hf.widths)
    for width, (k, v) in layers.items():
        x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(width))
        with torch.no_grad():
            for side, module in (("k", k), ("v", v)):
                torch.testing.assert_close(module(x, 0.7), net.pair(width)[side](x, 0.7), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_pt_sdtune_writes_opens_in_a1111_with_no_flags(family, subject_dir, tmp_path, capsys):
    ti, err = _train("textual-inversion", family, subject_dir, tmp_path / "ti", capsys,
                     "--token", "<zwx>", "--format", "a1111")
    # A1111 knows the embedding by its file stem: the run's last line says which word that is
    assert ti.name == "_zwx_.pt" and "write _zwx_ in the prompt" in err[-1] and "embeddings" in err[-1]
    _assert_a1111_embedding(ti, family, "_zwx_")
    hn, _ = _train("hypernetwork", family, subject_dir, tmp_path / "hn", capsys, "--token", "zwx", "--format", "a1111")
    _assert_a1111_hypernetwork(hn)
    # convert --to a1111 (an OUT.pt) from the safetensors forms
    for artifact, check in ((ti, lambda p: _assert_a1111_embedding(p, family, "_zwx_")),
                            (hn, _assert_a1111_hypernetwork)):
        st = _convert(artifact, tmp_path / "st" / f"{artifact.stem}.safetensors", capsys)
        back = _convert(st, tmp_path / "back" / artifact.name, capsys)
        check(back)
        assert _content(back) == _content(artifact)


def test_the_words_a1111_and_sdtune_answer_to_are_printed_for_every_layout(subject_dir, tmp_path, capsys):
    path, err = _train("textual-inversion", "sd1", subject_dir, tmp_path, capsys, "--token", "zwx-toy")
    assert path.name == "zwx-toy.safetensors"  # a token that is a valid file name is the word everywhere
    assert err[-1].startswith("in AUTOMATIC1111: copy zwx-toy.safetensors into stable-diffusion-webui/embeddings")
    assert "write zwx-toy in the prompt" in err[-1] and "embedding:zwx-toy" in err[-1]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_golden_torch_save_files_keep_loading_and_convert_to_files_a1111_opens(family, tmp_path, capsys):
    embedding, hypernetwork = GOLDEN / family / "embeddings" / "_zwx_.pt", GOLDEN / family / "hypernetworks" / "zwx.pt"
    for path in (embedding, hypernetwork):  # what A1111 refused before: torch 2.x's extra zip entries
        with pytest.raises(Exception, match="bad file inside"):
            check_pt(path)
    model = load(f"tiny:{family}")
    obj, meta = load_artifact(embedding)
    emb = read_embedding(obj, meta, embedding.stem)
    assert emb.token == ("<zwx>" if family == "sd1" else "_zwx_")  # an SDXL .pt carries no run card
    assert [v.shape for v in emb.vectors.values()] == [(1, e.config.hidden_size) for e in model.text_encoders]
    obj, meta = load_artifact(hypernetwork)
    hf = Hypernetwork().decode_file(model, obj, meta, hypernetwork)
    assert hf.card["base_model"] == f"tiny:{family}" and hf.entries["layer_structure"] == [1, 2, 1]
    for path, check in ((embedding, lambda p: _assert_a1111_embedding(p, family, "_zwx_")),
                        (hypernetwork, _assert_a1111_hypernetwork)):
        st = _convert(path, tmp_path / "st" / f"{path.stem}.safetensors", capsys)
        again = _convert(st, tmp_path / "pt" / path.name, capsys)
        check(again)
        assert _content(again) == _content(path)  # only the zip around the same entries changed


def test_written_pt_is_plain_torch_zip(tmp_path):
    obj = {"string_to_param": {"*": torch.randn(2, 8).half()}, "b": torch.arange(6, dtype=torch.bfloat16),
           "name": "x", "step": 3}
    data = pt_bytes(obj)
    assert pt_bytes(obj) == data  # no clock or temp name in the bytes
    path = tmp_path / "x.pt"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["archive/data.pkl", "archive/data/0", "archive/data/1", "archive/version"]
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0  # torch's alignment
    check_pt(path, "1.0")
    path.write_bytes(pt_bytes({**obj, "device": torch.device("cpu")}))  # a global off A1111's list
    with pytest.raises(Exception, match="global 'torch/device' is forbidden"):
        check_pt(path)
    path.write_bytes(data)
    for loaded in (torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True),
                   load_artifact(path)[0]):
        assert loaded["name"] == "x" and loaded["step"] == 3
        assert loaded["b"].dtype == torch.bfloat16 and torch.equal(loaded["b"], obj["b"])
        assert torch.equal(loaded["string_to_param"]["*"], obj["string_to_param"]["*"])


def _addnet_hash(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]


def test_generated_images_carry_a1111_parameters(subject_dir, tmp_path, capsys):
    art = tmp_path / "art"
    lora, _ = _train("lora", "sd1", subject_dir, art, capsys, "--token", "sks", "--name", "sks")
    emb, _ = _train("textual-inversion", "sd1", subject_dir, art, capsys, "--token", "<zwx>")
    hn, _ = _train("hypernetwork", "sd1", subject_dir, art, capsys, "--token", "hnx", "--name", "hnx")
    prompt = "a <zwx> sks photo, on grass <lora:sks:0.8> <hypernet:hnx:0.5>"
    common = ["generate", "--model", "tiny:sd1", "--artifacts", str(art), "--prompt", prompt, "--steps", "2",
              "--negative-prompt", "blurry, dark", "--seed", "7", "--guidance", "6", "--clip-skip", "2"]
    assert main([*common, "--scheduler", "euler_a", "-n", "2", "--output", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"using lora sks (weight 0.8) from {lora}", f"using hypernet hnx (weight 0.5) from {hn}",
                   f"using embedding <zwx> (1 vector) from {emb}"]
    texts = [read_info_from_image(tmp_path / name) for name in ("out.png", "out-0.png", "out-1.png")]
    assert texts[0] == texts[1] != texts[2]  # the grid has its first image's text
    fields = parse_generation_parameters(texts[2])
    assert fields["Prompt"] == prompt and fields["Negative prompt"] == "blurry, dark"
    expected = {"Steps": "2", "Sampler": "Euler a", "CFG scale": "6.0", "Seed": "7", "Size-1": "32", "Size-2": "32",
                "Model hash": load("tiny:sd1").fingerprint()[:10], "Model": "tiny:sd1", "Clip skip": "2",
                "Batch size": "2", "Batch pos": "1", "Lora hashes": f"sks: {_addnet_hash(lora)}",
                "TI hashes": f"<zwx>: {hashlib.sha256(emb.read_bytes()).hexdigest()[:12]}"}
    assert {k: fields.get(k) for k in expected} == expected
    # JPEG: the same text in the EXIF UserComment, as piexif reads it; one image, no batch; pipeline's CFG
    assert main([*common[:-6], "--scheduler", "dpm++2m_karras", "--output", str(tmp_path / "out.jpg")]) == 0
    fields = parse_generation_parameters(read_info_from_image(tmp_path / "out.jpg"))
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras" and fields["CFG scale"] == "7.5"
    assert "Batch size" not in fields and "Clip skip" not in fields and fields["Seed"] == "0"


def test_every_scheduler_has_an_a1111_sampler_name():
    import diffusers

    for name, (cls_name, _) in SCHEDULERS.items():
        assert cls_name in A1111_SAMPLERS and hasattr(diffusers, cls_name), name


def test_a_checkpoint_files_model_hash_is_a1111s_short_hash(tmp_path):
    path = tmp_path / "my,model.safetensors"
    path.write_bytes(b"pretend checkpoint bytes" * 1000)
    model = SimpleNamespace(source=str(path), extras={})
    assert model_identity(model) == (hashlib.sha256(path.read_bytes()).hexdigest()[:10], "my,model")
    shutil.copy(path, tmp_path / "copy.ckpt")
    assert model_identity(SimpleNamespace(source=str(tmp_path / "copy.ckpt"), extras={}))[0] == model_identity(model)[0]
