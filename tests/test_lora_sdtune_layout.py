"""sdtune's own LoRA layout does not depend on the transformers version: text-encoder layers are written under
one spelling (`text_model.`, as in every other file layout) and read in both, so files from earlier versions
(golden files, written under transformers 5 and, renamed, as transformers 4.x named them) keep loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.artifacts import load_artifact
from sdtune.cli import main
from sdtune.formats.lora import from_sdtune
from sdtune.formats.lycoris import KOHYA_PARAMS, param_of
from sdtune.methods.lora import LoRA
from sdtune.model import load

GOLDEN = Path(__file__).parent / "golden" / "lora-sdtune-layout"  # sdtune 0.1.0, `--format sdtune`
SPELLINGS = ("transformers5", "transformers4")


def _generate(family: str, artifacts: Path | None, out: Path) -> torch.Tensor:
    prompt = "a sks <lora:zwx:1>" if artifacts else "a sks"
    argv = ["generate", "--model", f"tiny:{family}", "--prompt", prompt, "--steps", "2", "--output", str(out)]
    assert main(argv + (["--artifacts", str(artifacts)] if artifacts else [])) == 0
    return torch.tensor(list(Image.open(out).getdata()), dtype=torch.float32)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_golden_files_of_both_transformers_spellings_give_the_same_image(family, tmp_path, capsys):
    base = _generate(family, None, tmp_path / "base.png")
    images = [_generate(family, GOLDEN / family / spelling, tmp_path / f"{spelling}.png") for spelling in SPELLINGS]
    assert torch.equal(images[0], images[1])
    assert (images[0] - base).abs().max() > 0, "the LoRA changed nothing"
    model = load(f"tiny:{family}")
    path = GOLDEN / family / "transformers4" / "zwx.safetensors"
    state = LoRA().decode_file(model, *load_artifact(path), path)
    live = {c: {n for n, _ in m.named_modules()} for c, m in model.components().items()}
    paths = [(c, rest[: -len(param_of(rest, KOHYA_PARAMS)) - 1]) for c, _, rest in (k.partition(".") for k in state)]
    assert any(c == "text_encoder" for c, _ in paths) and all(p in live[c] for c, p in paths)  # the installed names


def test_written_names_are_canonical_and_read_under_either_live_spelling(tmp_path, capsys):
    golden = GOLDEN / "sd1" / "transformers5" / "zwx.safetensors"
    written = tmp_path / "zwx.safetensors"
    assert main(["convert", str(golden), str(written), "--to", "sdtune"]) == 0
    tensors, _ = load_artifact(written)
    old, _ = load_artifact(golden)
    text = sorted(k for k in tensors if k.startswith("text_encoder."))
    assert text and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text)
    assert sorted(k.replace("text_encoder.text_model.", "text_encoder.") for k in tensors) == sorted(old)
    assert all(torch.equal(tensors[k], old[k.replace("text_encoder.text_model.", "text_encoder.")]) for k in tensors)
    model = load("tiny:sd1")
    flat = {c: [n for n, _ in m.named_modules()] for c, m in model.components().items() if c != "vae"}
    nested = {c: [f"text_model.{n}" if c != "unet" and n else n for n in names] for c, names in flat.items()}
    for paths, spelled in ((flat, "text_encoder.encoder."), (nested, "text_encoder.text_model.encoder.")):
        for source in (tensors, old):  # each file, under a transformers that nests text_model. and one that does not
            state = from_sdtune(source, paths)
            assert sorted(k for k in state if k.startswith("text_encoder")) == \
                sorted(k for k in state if k.startswith(spelled))
            assert len(state) == len(source)
