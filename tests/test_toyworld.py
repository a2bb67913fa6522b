"""The toy world's renderer, caption grammar and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from sdtune.errors import SdtuneError
from sdtune.toyworld.captions import (
    EMPTY_INDEX, RARE_TOKENS, SPARE_TOKENS, all_captions, caption, caption_from_index, parse_caption,
    sample_caption_indices, vocabulary, world_words, write_tokenizer,
)
from sdtune.toyworld.trainset import TrainSet, sample_captions, step_generator
from sdtune.toyworld.world import (
    COLOURS, POSITIONS, SHAPES, Scene, render, render_batch, sample_scenes, scenes_to_batch, shape_coverage,
)

KEEP = {"colour": 0.85, "size": 0.5, "position": 0.6, "background": 0.8}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_renderer_is_deterministic_and_seeded():
    a = render_batch(sample_scenes(64, seed=3))
    assert torch.equal(a, render_batch(sample_scenes(64, seed=3)))
    assert not torch.equal(a, render_batch(sample_scenes(64, seed=4)))
    batch = sample_scenes(64, seed=3)
    assert np.array_equal(render(batch.scene(2)), a[2].permute(1, 2, 0).numpy())  # one path for both


@pytest.mark.parametrize("size", [32, 64])
def test_render_draws_the_scene(size):
    img = render(Scene("square", "red", "blue", "large", "top left"), size).astype(int)
    assert img.shape == (size, size, 3)
    assert tuple(img[-1, -1]) == COLOURS["blue"]  # background far from the object
    x, y = (int(v * size) for v in POSITIONS["top left"])
    assert tuple(img[y, x]) == COLOURS["red"]  # the object at its anchor
    subject = render(Scene("circle", "yellow", "green", "large", "center", pattern="quadrants",
                           colour2="purple"), size).astype(int)
    q = size // 2 - size // 8, size // 2 + size // 8
    assert tuple(subject[q[0], q[0]]) == tuple(subject[q[1], q[1]]) == COLOURS["yellow"]
    assert tuple(subject[q[0], q[1]]) == tuple(subject[q[1], q[0]]) == COLOURS["purple"]


def test_shapes_are_distinct_and_sizes_differ():
    n = len(SHAPES)
    cov = shape_coverage(torch.arange(n), torch.full((n,), 0.5), torch.full((n,), 0.5), torch.full((n,), 0.3), 64)
    for i in range(n):
        for j in range(i + 1, n):
            iou = torch.minimum(cov[i], cov[j]).sum() / torch.maximum(cov[i], cov[j]).sum()
            assert iou < 0.85, (SHAPES[i], SHAPES[j])
    small = render(Scene("circle", "white", "black", "small"))
    large = render(Scene("circle", "white", "black", "large"))
    assert (large > 128).sum() > 1.8 * (small > 128).sum()


def test_object_never_shares_the_background_colour():
    b = sample_scenes(2000, seed=0)
    assert (b.colour != b.background).all()
    assert len(set(b.shape)) == len(SHAPES) and len(set(b.position)) == len(POSITIONS)


def test_caption_grammar_allows_every_optional_part_to_be_left_out():
    assert caption("circle") == "a circle"
    assert caption("circle", "red", background="blue") == "a red circle on a blue background"
    full = caption("star", "red", "large", "top left", "blue")
    assert full == "a large red star at the top left on a blue background"
    assert caption("cross", "orange", background="orange") == "an orange cross on an orange background"
    assert parse_caption(full) == {"shape": "star", "colour": "red", "size": "large", "position": "top left",
                                   "background": "blue", "identifier": None}
    assert parse_caption("a sks circle in the center")["identifier"] == "sks"
    caps = all_captions()
    assert len(set(caps)) == len(caps) and caps[EMPTY_INDEX] == ""
    for i in range(0, EMPTY_INDEX, 97):  # every form in the table parses back to the attributes it was built from
        text = caption_from_index(i)
        p = parse_caption(text)
        assert caption(p["shape"], p["colour"], p["size"], p["position"], p["background"]) == text
    with pytest.raises(SdtuneError):
        parse_caption("a red thing")


def test_every_caption_word_and_reserved_token_is_one_token(tokenizer):
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for text in all_captions()[::211]:
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(text.split())
    assert tokenizer.model_max_length == 77


def test_rare_and_spare_tokens_never_occur_in_pretraining_captions(tokenizer):
    caps = all_captions()
    used = set(torch.tensor(tokenizer(caps, padding="max_length", max_length=77).input_ids).unique().tolist())
    reserved = {tokenizer.convert_tokens_to_ids(t + "</w>") for t in RARE_TOKENS + SPARE_TOKENS}
    assert len(reserved) == len(RARE_TOKENS) + len(SPARE_TOKENS)
    assert not used & reserved
    assert not set(world_words()) & set(RARE_TOKENS + SPARE_TOKENS)
    assert "sks" in RARE_TOKENS


def test_sampled_captions_match_their_images_and_include_empty_ones(tokenizer):
    b = sample_scenes(4000, seed=1)
    rng = np.random.default_rng(0)
    idx = sample_caption_indices(b.shape, b.colour, b.size, b.position, b.background, rng, KEEP, p_empty=0.12)
    assert 0.1 <= (idx == EMPTY_INDEX).mean() <= 0.14
    names = {"colour": list(COLOURS), "size": ["small", "large"], "position": list(POSITIONS),
             "background": list(COLOURS), "shape": list(SHAPES)}
    for i in np.flatnonzero(idx != EMPTY_INDEX)[:300]:
        for key, value in parse_caption(caption_from_index(int(idx[i]))).items():
            if key != "identifier" and value is not None:
                assert names[key].index(value) == getattr(b, key)[i]
    # The training loop's on-device sampler draws from the same table.
    ids = torch.tensor(tokenizer(all_captions(), padding="max_length", max_length=77).input_ids)
    attrs = {k: torch.as_tensor(getattr(b, k)) for k in ("shape", "colour", "size", "position", "background")}
    data = TrainSet(torch.zeros(len(b), 3, 1, 1, dtype=torch.uint8), attrs, ids)
    rows = sample_captions(data, torch.arange(200), step_generator(torch.device("cpu"), 0, 2, 0),
                           {"keep": KEEP, "p_empty": 0.12})
    for i, row in enumerate(rows):
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        if text:
            assert SHAPES[b.shape[i]] in text.split()
            if "background" in text:
                assert parse_caption(text)["background"] == list(COLOURS)[b.background[i]]


def test_scene_batch_round_trips():
    scenes = [Scene("heart", "green", "white", "small", "bottom left", 0.015625, -0.0078125, 1.0625),
              Scene("circle", "yellow", "blue", pattern="quadrants", colour2="purple")]
    b = scenes_to_batch(scenes)
    assert [b.scene(i) for i in range(2)] == scenes


def test_held_out_combinations_are_never_drawn_for_pretraining_and_are_all_the_check_asks_for():
    from sdtune.toyworld.check import probe_prompts
    from sdtune.toyworld.captions import parse_caption
    from sdtune.toyworld.world import COLOURS, SHAPES, held_out_combinations, sample_scenes

    held = held_out_combinations()
    assert len(held) == 24 and all(c != b for _, c, b in held)
    names = lambda s, c, b: (SHAPES[s], list(COLOURS)[c], list(COLOURS)[b])  # noqa: E731
    seen = set(zip(*(sample_scenes(20000, seed=3, held_out="exclude").__dict__[k] for k in ("shape", "colour", "background"))))
    assert not seen & held and len(seen) == 336 - 24  # everything else still appears
    only = set(zip(*(sample_scenes(2000, seed=3, held_out="only").__dict__[k] for k in ("shape", "colour", "background"))))
    assert only == held
    asked = {(p["shape"], p["colour"], p["background"]) for p in map(parse_caption, probe_prompts(200, held_out=True))}
    assert asked <= {names(*t) for t in held}
    # The default draw is unchanged by the option (the shipped model's data and checks stay reproducible).
    a, b = sample_scenes(500, seed=5), sample_scenes(500, seed=5, held_out="any")
    assert all((getattr(a, k) == getattr(b, k)).all() for k in ("shape", "colour", "background", "size", "position"))
