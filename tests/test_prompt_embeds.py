"""A1111 emphasis, long prompts and clip skip, checked against embeddings computed by hand."""

from __future__ import annotations

import torch

from sdtune.model import load
from sdtune.prompt_embeds import CHUNK, pipeline_prompt_kwargs, tokenize_weighted


def _ids(tokenizer, words):
    return tokenizer(words, add_special_tokens=False).input_ids


def _padded(tokenizer, body):
    ids = [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    return torch.tensor([ids + [tokenizer.pad_token_id] * (77 - len(ids))])


def test_plain_prompts_go_to_diffusers_unchanged():
    model = load("tiny:sd1")
    assert pipeline_prompt_kwargs(model, "a red dog", "") == {"prompt": "a red dog", "negative_prompt": None}
    assert "prompt_embeds" in pipeline_prompt_kwargs(model, "a red dog", "blue", clip_skip=2)


def test_emphasis_matches_hand_computed_embedding():
    model = load("tiny:sd1")
    tok, te = model.tokenizer, model.text_encoder
    kwargs = pipeline_prompt_kwargs(model, "a (red:1.5) [dog]", "")
    a, red, dog = _ids(tok, "a"), _ids(tok, "red"), _ids(tok, "dog")
    with torch.no_grad():
        z = te(_padded(tok, a + red + dog)).last_hidden_state
    weights = torch.ones(77)
    weights[1 + len(a): 1 + len(a) + len(red)] = 1.5
    weights[1 + len(a) + len(red): 1 + len(a) + len(red) + len(dog)] = 1 / 1.1
    expected = z * weights[None, :, None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(kwargs["prompt_embeds"], expected)
    assert kwargs["negative_prompt_embeds"].shape == expected.shape


def test_long_prompts_are_encoded_in_chunks_and_the_first_matches_diffusers():
    model = load("tiny:sd1")
    words = " ".join(["red dog"] * 60)  # 120 whole-word tokens
    tokens = tokenize_weighted(model.tokenizer, words)
    assert [len(c) for c in tokens.chunks] == [CHUNK, 120 - CHUNK]
    kwargs = pipeline_prompt_kwargs(model, words, "")
    assert kwargs["prompt_embeds"].shape == (1, 154, 32)
    assert kwargs["negative_prompt_embeds"].shape == (1, 154, 32)
    reference, _ = model.pipeline().encode_prompt(words, "cpu", 1, False)
    torch.testing.assert_close(kwargs["prompt_embeds"][:, :77], reference)


def test_break_starts_a_new_chunk_and_commas_keep_phrases_whole():
    model = load("tiny:sd1")
    assert len(tokenize_weighted(model.tokenizer, "a red dog BREAK a blue cat").chunks) == 2
    phrase = ", ".join(["red dog"] * 30)  # 30 * 3 tokens with commas
    chunks = tokenize_weighted(model.tokenizer, phrase).chunks
    comma = _ids(model.tokenizer, ",")[0]
    assert chunks[0][-1] == comma and len(chunks[0]) <= CHUNK


def test_clip_skip_uses_an_earlier_layer_with_the_final_norm():
    model = load("tiny:sd1")
    tok, te = model.tokenizer, model.text_encoder
    kwargs = pipeline_prompt_kwargs(model, "(red) dog", "", clip_skip=2)
    red, dog = _ids(tok, "red"), _ids(tok, "dog")
    with torch.no_grad():
        hidden = te(_padded(tok, red + dog), output_hidden_states=True).hidden_states[-2]
        z = te.final_layer_norm(hidden) if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm(hidden)
    weights = torch.ones(77)
    weights[1: 1 + len(red)] = 1.1
    expected = z * weights[None, :, None]
    torch.testing.assert_close(kwargs["prompt_embeds"], expected * (z.mean() / expected.mean()))


def test_sdxl_weighted_prompts_give_both_encoders_and_pooled():
    model = load("tiny:sdxl")
    kwargs = pipeline_prompt_kwargs(model, "a (red:1.3) dog", "blurry")
    assert kwargs["prompt_embeds"].shape == (1, 77, 64)
    assert kwargs["pooled_prompt_embeds"].shape == (1, 32)
    plain = model.pipeline().encode_prompt("a red dog", device="cpu", do_classifier_free_guidance=False)
    weighted_one = pipeline_prompt_kwargs(model, "a (red:1.0) dog BREAK", "")
    torch.testing.assert_close(weighted_one["prompt_embeds"], plain[0])
    torch.testing.assert_close(weighted_one["pooled_prompt_embeds"], plain[2])


def test_generate_with_clip_skip_and_emphasis_through_the_cli(tiny_pipeline_dirs, tmp_path):
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from sdtune.cli import main

    model_dir = tiny_pipeline_dirs["sd1"]

    def ours(prompt, *extra):
        out = tmp_path / f"{abs(hash((prompt, extra)))}.png"
        assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--steps", "4", "--seed", "1",
                     "--output", str(out), *extra]) == 0
        return np.asarray(Image.open(out), dtype=np.float32)

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    theirs = np.asarray(pipe("a red dog", num_inference_steps=4,
                             generator=torch.Generator().manual_seed(1)).images[0], dtype=np.float32)
    plain = ours("a red dog")
    assert np.array_equal(plain, theirs)
    assert not np.array_equal(ours("a red dog", "--clip-skip", "2"), plain)
    assert not np.array_equal(ours("a (red:1.6) dog"), plain)
