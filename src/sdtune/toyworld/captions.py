"""Caption grammar, its vocabulary and the toy world's CLIP tokenizer.

Grammar: ``a [SIZE] [COLOUR] SHAPE [POSITION] [on a COLOUR background]`` where every bracketed part may be
left out, e.g. "a circle", "a red circle on a blue background", "a large red star at the top left on a blue
background". Because the grammar is small, every caption the pretraining can ever see is enumerated in a
table; training draws table indices with vectorised arithmetic and never builds strings in the loop.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from sdtune.errors import SdtuneError
from sdtune.tokenizer_build import write_clip_tokenizer
from sdtune.toyworld.world import COLOUR_NAMES, POSITION_NAMES, SHAPES, SIZE_NAMES

POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
# DreamBooth-style identifiers: real tokens of the vocabulary that never occur in a pretraining caption.
RARE_TOKENS: tuple[str, ...] = ("sks", "zwx", "qrv", "vbk", "jhq", "xzt", "pqd", "wkv")
# Reserved single-token slots (never in pretraining captions) for placeholders such as Textual Inversion.
SPARE_TOKENS: tuple[str, ...] = tuple(f"spare{a}{b}" for a, b in itertools.product("abcd", "abcdef"))

# Sizes of the caption table: each optional attribute has "omitted" (0) plus one value per name.
_DIMS = (len(SHAPES), len(COLOUR_NAMES) + 1, len(SIZE_NAMES) + 1, len(POSITION_NAMES) + 1, len(COLOUR_NAMES) + 1)
NUM_CAPTIONS = int(np.prod(_DIMS))
EMPTY_INDEX = NUM_CAPTIONS  # the empty caption (classifier-free guidance) follows the table


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    shape: str, colour: str | None = None, size: str | None = None, position: str | None = None,
    background: str | None = None, identifier: str | None = None,
) -> str:
    """Build a caption; attributes left as None are omitted. `identifier` goes before the class word."""
    words = [w for w in (size, colour, identifier, shape) if w]
    text = f"{_article(words[0])} {' '.join(words)}"
    if position:
        text += f" {POSITION_PHRASES[position]}"
    if background:
        text += f" on {_article(background)} {background} background"
    return text


def caption_index(shape, colour, size, position, background):
    """Table index for attribute indices (arrays or ints); -1 means "omitted" for the optional ones."""
    idx = shape
    for value, dim in zip((colour, size, position, background), _DIMS[1:]):
        idx = idx * dim + (value + 1)
    return idx


def caption_from_index(index: int) -> str:
    """The caption stored at a table index (EMPTY_INDEX gives "")."""
    if index == EMPTY_INDEX:
        return ""
    parts = []
    for dim in reversed(_DIMS[1:]):
        index, rem = divmod(index, dim)
        parts.append(rem - 1)
    bg, pos, size, colour = parts
    pick = lambda names, i: names[i] if i >= 0 else None  # noqa: E731
    return caption(SHAPES[index], pick(COLOUR_NAMES, colour), pick(SIZE_NAMES, size),
                   pick(POSITION_NAMES, pos), pick(COLOUR_NAMES, bg))


def all_captions() -> list[str]:
    """Every pretraining caption in table order, the empty caption last."""
    return [caption_from_index(i) for i in range(NUM_CAPTIONS + 1)]


def sample_caption_indices(
    shape, colour, size, position, background, rng: np.random.Generator, keep: dict[str, float],
    p_empty: float,
) -> np.ndarray:
    """Draw one caption per scene: each optional part kept with its probability, some captions empty."""
    n = len(shape)
    drop = lambda key, v: np.where(rng.random(n) < keep[key], v, -1)  # noqa: E731
    idx = caption_index(np.asarray(shape), drop("colour", colour), drop("size", size),
                        drop("position", position), drop("background", background))
    return np.where(rng.random(n) < p_empty, EMPTY_INDEX, idx)


def world_words() -> list[str]:
    """Every word that can occur in a pretraining caption."""
    words = {"a", "an", "on", "background", *SHAPES, *COLOUR_NAMES, *SIZE_NAMES}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def vocabulary() -> list[str]:
    """World words, then rare identifier tokens, then spare tokens: each one token in the tokenizer."""
    return world_words() + list(RARE_TOKENS) + list(SPARE_TOKENS)


def write_tokenizer(out_dir: str | Path) -> Path:
    """Write the toy world's CLIPTokenizer files into out_dir."""
    return write_clip_tokenizer(out_dir, vocabulary())


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the attributes a prompt asks for (None where omitted); raises SdtuneError outside the grammar."""
    words = text.lower().replace(",", " ").split()
    found: dict[str, str | None] = dict.fromkeys(("shape", "colour", "size", "position", "background",
                                                   "identifier"))
    if "background" in words:
        k = words.index("background")
        if k < 1 or words[k - 1] not in COLOUR_NAMES:
            raise SdtuneError(f"Prompt {text!r} names a background without one of the colours {COLOUR_NAMES}.")
        found["background"] = words[k - 1]
        words = words[: max(0, k - 3)] if k >= 3 and words[k - 3] == "on" else words[: k - 1]
    for name, phrase in POSITION_PHRASES.items():
        tail = phrase.split()[1:]  # "the top left"
        for k in range(len(words) - len(tail) + 1):
            if words[k:k + len(tail)] == tail:
                found["position"] = name
                words = words[:max(0, k - 1)] + words[k + len(tail):]
                break
    for w in words:
        if w in SHAPES:
            found["shape"] = w
        elif w in COLOUR_NAMES:
            found["colour"] = w
        elif w in SIZE_NAMES:
            found["size"] = w
        elif w in RARE_TOKENS or w in SPARE_TOKENS or w.startswith("<"):
            found["identifier"] = w
    if found["shape"] is None:
        raise SdtuneError(f"Prompt {text!r} names none of the toy world's shapes {SHAPES}.")
    return found
