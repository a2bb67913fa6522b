"""The DreamBooth paper's metrics (sdtune.metrics) on tiny random CLIP and ViT models: the arithmetic, not
the models, is under test (identical images score 1, an image against its own prompt text, and so on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.metrics import distinctness, image_similarity, load_encoder, subject_distance, text_similarity


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from tiny_encoders import make_clip, make_dino

    root = tmp_path_factory.mktemp("encoders")
    return load_encoder("clip", str(make_clip(root / "clip"))), load_encoder("dino", str(make_dino(root / "dino")))


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def test_identical_images_score_one_and_are_not_diverse(encoders, pictures):
    for encoder in encoders:
        emb = encoder.images(pictures)
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)  # unit vectors
        same = image_similarity(emb[:1].repeat(3, 1), emb[:1])
        assert same.value == pytest.approx(1.0, abs=1e-5) and same.n == 3
        assert subject_distance(emb[:1], emb[:1]).value == pytest.approx(0.0, abs=1e-5)
        twins = distinctness(emb[[0, 0, 1, 1]], ["p", "p", "q", "q"])
        assert twins.value == pytest.approx(0.0, abs=1e-5) and twins.n == 4


def test_similarity_is_the_mean_cosine_to_the_references(encoders, pictures):
    clip, _ = encoders
    emb = clip.images(pictures)
    expected = float((emb[:2] @ emb[2:].T).mean())
    assert image_similarity(emb[:2], emb[2:]).value == pytest.approx(expected, abs=1e-6)
    different = distinctness(emb, ["p"] * 4)
    assert different.value == pytest.approx(1.0 - float((emb @ emb.T)[~torch.eye(4, dtype=bool)].mean()), abs=1e-6)


def test_clip_t_pairs_each_image_with_its_own_prompt(encoders, pictures):
    clip, dino = encoders
    texts = clip.texts(["a photo of a dog", "a red toy on the beach"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)
    images = clip.images(pictures[:2])
    expected = float((images * texts).sum(dim=1).mean())
    assert text_similarity(images, texts).value == pytest.approx(expected, abs=1e-6)
    # An "image" whose embedding is its prompt's scores exactly 1.
    assert text_similarity(texts, texts).value == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SdtuneError, match="--clip-model"):
        dino.texts(["a dog"])


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(SdtuneError, match="--dino-model") as info:
        load_encoder("dino", str(tmp_path / "nowhere"))
    assert len(str(info.value).splitlines()) == 1
