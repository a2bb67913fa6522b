"""How prompts are worded for the builtin model: its own caption grammar instead of "a photo of ...".

Training methods read these through `SDModel.extras` (set when `sdtune.model.load("builtin")` loads it).
"""

from __future__ import annotations

from sdtune.toyworld.captions import RARE_TOKENS, caption
from sdtune.toyworld.world import COLOURS

TOKEN, CLASS = "{token}", "{class_word}"


def prompt_conventions() -> dict:
    """Templates with {token}/{class_word} placeholders, in words the builtin model was pretrained on."""
    # Textual Inversion's new word stands for the whole object, so it takes the shape word's place.
    object_templates = [caption(TOKEN), caption(TOKEN, size="large"), caption(TOKEN, size="small")]
    return {
        "prompt_template": caption(CLASS, identifier=TOKEN),  # "a {token} {class_word}"
        "class_prompt_template": caption(CLASS),  # "a {class_word}": for class images without a caption
        "class_prompt_templates": class_prompt_templates(),
        "ti_templates": {"object": object_templates, "style": object_templates},
        "rare_tokens": list(RARE_TOKENS),
    }


def class_prompt_templates() -> list[str]:
    """Prior preservation's prompts: the class object in every colour on every other background. "a circle"
    alone gives nearly the same picture every time at guidance 7.5, which would preserve only that one
    picture. Ordered so that any run of 8 prompts has every colour once on 8 different backgrounds."""
    colours = list(COLOURS)
    return [caption(CLASS, colour=colour, background=colours[(i + shift) % len(colours)])
            for shift in range(1, len(colours)) for i, colour in enumerate(colours)]
