"""The README's LoRA recipe on the builtin model learns the builtin subject: at the documented settings (the
builtin defaults, seed 0) the subject appears in its own instance contexts (mean toy-world subject score at
least 0.5 over 8 images). A full 400-step run: the one slow test that proves the defaults learn."""

from __future__ import annotations

from sdtune.cli import main
from sdtune.toyworld.subject import read_subject

COUNT = 8


def test_the_documented_lora_recipe_shows_the_subject_in_its_own_contexts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SDTUNE_MAX_STEPS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["subject", "photos/"]) == 0
    assert main(["train", "lora", "--model", "builtin", "--images", "photos/", "--class-word", "circle",
                 "--output", "out/", "--quiet", "--log-dir", "none"]) == 0
    captions = sorted(p.read_text().strip() for p in (tmp_path / "photos").glob("*.txt"))
    from PIL import Image

    images = []
    for i in range(COUNT):
        target = tmp_path / f"img-{i}.png"
        assert main(["generate", "--model", "builtin", "--prompt", f"{captions[i % len(captions)]} <lora:sks:1>",
                     "--artifacts", "out/", "--seed", str(i), "--output", str(target)]) == 0
        images.append(Image.open(target).convert("RGB"))
    scores = [reading.score for reading in read_subject(images)]
    capsys.readouterr()
    print(f"subject scores: {[round(s, 3) for s in scores]}, mean {sum(scores) / COUNT:.3f}")
    assert sum(scores) / COUNT >= 0.5, scores
