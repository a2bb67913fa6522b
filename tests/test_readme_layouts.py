"""The README says which files sdtune writes as .safetensors and which as .pt, and it matches the layouts the
methods declare: only the AUTOMATIC1111 layouts are .pt (as A1111 writes them); every other file is a .safetensors."""

from __future__ import annotations

from pathlib import Path

from sdtune.methods import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_names_the_pt_layouts_and_only_those():
    written = [(cls, layout) for cls in registry().values() for layout in cls.layouts if layout.written]
    pt = {layout.name for _, layout in written if layout.suffix == ".pt"}
    assert pt == {"a1111"}
    assert {layout.suffix for _, layout in written if layout.name != "a1111"} <= {".safetensors", "/"}
    text = " ".join(README.read_text(encoding="utf-8").split())
    pt_methods = sorted(cls.label.lower() for cls, layout in written if layout.suffix == ".pt")
    assert "The AUTOMATIC1111 layouts are `.pt`, as A1111 writes them: hypernetworks and embeddings" in text
    assert pt_methods == ["hypernetwork", "textual inversion"]
    assert "every file sdtune writes is a .safetensors" not in text.lower()
