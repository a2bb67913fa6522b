"""How prompts are worded for the builtin model: its own caption grammar instead of "a photo of ...".

Training methods read these through `SDModel.extras` (set when `sdtune.model.load("builtin")` loads it).
"""

from __future__ import annotations

from sdtune.toyworld.captions import RARE_TOKENS, caption

TOKEN, CLASS = "{token}", "{class_word}"


def prompt_conventions() -> dict:
    """Templates with {token}/{class_word} placeholders, in words the builtin model was pretrained on."""
    # Textual Inversion's new word stands for the whole object, so it takes the shape word's place.
    object_templates = [caption(TOKEN), caption(TOKEN, size="large"), caption(TOKEN, size="small")]
    return {
        "prompt_template": caption(CLASS, identifier=TOKEN),  # "a {token} {class_word}"
        "class_prompt_template": caption(CLASS),  # "a {class_word}"
        "ti_templates": {"object": object_templates, "style": object_templates},
        "rare_tokens": list(RARE_TOKENS),
    }
