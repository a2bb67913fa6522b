"""A1111-style prompt embeddings: emphasis weights, prompts longer than 75 tokens in chunks, clip skip.

Plain prompts never come here: generation hands them to the diffusers pipeline unchanged, so they stay
bit-identical to diffusers. Weighted or long prompts are encoded the way A1111 does it: tokens are cut
into chunks of 75 (at BREAK, or at a comma among the last 20 tokens), each chunk is wrapped in start/end
tokens and padded to 77, encoded on its own, the hidden states are multiplied by each token's weight and
rescaled so their mean is unchanged, and the chunks are concatenated along the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt import BREAK_WEIGHT, parse_emphasis

CHUNK = 75  # tokens per chunk between the start and end tokens
COMMA_BACKTRACK = 20


@dataclass
class WeightedTokens:
    chunks: list[list[int]]
    weights: list[list[float]]


def is_plain(tokenizer, text: str) -> bool:
    """True when diffusers' own prompt handling gives the same result: no emphasis, BREAK or overflow."""
    fragments = parse_emphasis(text)
    if len(fragments) != 1 or fragments[0][1] != 1.0 or fragments[0][0] != text:
        return False
    return len(tokenizer(text, add_special_tokens=False).input_ids) <= CHUNK


def tokenize_weighted(tokenizer, text: str) -> WeightedTokens:
    """Emphasis fragments -> chunks of at most 75 token ids with one weight per token."""
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma_id = comma[0] if len(comma) == 1 else None
    chunks, weights = [[]], [[]]
    last_comma = -1

    def new_chunk() -> None:
        nonlocal last_comma
        chunks.append([])
        weights.append([])
        last_comma = -1

    for fragment, weight in parse_emphasis(text):
        if weight == BREAK_WEIGHT:
            new_chunk()
            continue
        for token in tokenizer(fragment, add_special_tokens=False).input_ids:
            if len(chunks[-1]) == CHUNK:
                # Like A1111, move the words after a recent comma to the next chunk instead of cutting them.
                if last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
                    carry_ids, carry_w = chunks[-1][last_comma + 1:], weights[-1][last_comma + 1:]
                    del chunks[-1][last_comma + 1:], weights[-1][last_comma + 1:]
                    new_chunk()
                    chunks[-1] += carry_ids
                    weights[-1] += carry_w
                else:
                    new_chunk()
            if token == comma_id:
                last_comma = len(chunks[-1])
            chunks[-1].append(token)
            weights[-1].append(weight)
    kept = [(c, w) for c, w in zip(chunks, weights) if c] or [([], [])]
    return WeightedTokens([c for c, _ in kept], [w for _, w in kept])


def _hidden(encoder, ids: torch.Tensor, layer_from_end: int, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-layer_from_end]
    if final_norm and layer_from_end > 1:
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    elif final_norm:
        hidden = out[0] if out[0].dim() == 3 else out.last_hidden_state
    return hidden, out[0]


def _encode_chunks(model, tokens: WeightedTokens, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode each chunk with every text encoder, weight it, and join the chunks along the sequence."""
    device = model.text_encoder.device
    parts, pooled = [], None
    for index, (chunk, weights) in enumerate(zip(tokens.chunks, tokens.weights)):
        per_encoder = []
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            ids = [tokenizer.bos_token_id] + chunk + [tokenizer.eos_token_id]
            ids = ids + [pad] * (CHUNK + 2 - len(ids))
            ids_t = torch.tensor([ids], device=device)
            if model.family == "sdxl":  # SDXL conditions on the penultimate layer, without the final norm
                hidden, first = _hidden(encoder, ids_t, clip_skip + 1, final_norm=False)
                if index == 0 and encoder is model.text_encoders[-1]:
                    pooled = first
            else:
                hidden, _ = _hidden(encoder, ids_t, clip_skip, final_norm=True)
            per_encoder.append(hidden)
        z = torch.cat(per_encoder, dim=-1)
        multipliers = torch.tensor([1.0] + weights + [1.0] * (CHUNK + 1 - len(weights)), device=device, dtype=z.dtype)
        original_mean = z.mean()
        z = z * multipliers[None, :, None]
        z = z * (original_mean / z.mean())  # A1111 keeps the mean so emphasis reweights, not rescales
        parts.append(z)
    return torch.cat(parts, dim=1), pooled


@torch.no_grad()
def pipeline_prompt_kwargs(model, prompt: str, negative: str, clip_skip: int = 1) -> dict:
    """Keyword arguments for the diffusers pipeline: the plain strings when diffusers would get them right,
    else prompt/negative embeddings (equal chunk counts, as classifier-free guidance needs)."""
    tokenizer = model.tokenizer
    # diffusers' own clip_skip reaches for `text_encoder.text_model`, which transformers 5's CLIPTextModel
    # no longer has, so clip skip is always handled here.
    if clip_skip == 1 and is_plain(tokenizer, prompt) and is_plain(tokenizer, negative):
        return {"prompt": prompt, "negative_prompt": negative or None}
    positive, negative_tokens = tokenize_weighted(tokenizer, prompt), tokenize_weighted(tokenizer, negative)
    for shorter in (positive, negative_tokens):
        while len(shorter.chunks) < max(len(positive.chunks), len(negative_tokens.chunks)):
            shorter.chunks.append([])
            shorter.weights.append([])
    embeds, pooled = _encode_chunks(model, positive, clip_skip)
    negative_embeds, negative_pooled = _encode_chunks(model, negative_tokens, clip_skip)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if model.family == "sdxl":
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs
