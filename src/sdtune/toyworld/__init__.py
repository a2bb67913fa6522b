"""The toy world: procedural shapes, captions, the builtin base model, its subjects, evaluators and metrics.

Importing this package is cheap; the names below load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from sdtune.errors import SdtuneError

_EXPORTS = {
    "world": ("Scene", "SceneBatch", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "render", "render_batch",
              "sample_scenes", "scenes_to_batch", "to_pil"),
    "captions": ("caption", "parse_caption", "all_captions", "vocabulary", "write_tokenizer", "RARE_TOKENS",
                 "SPARE_TOKENS"),
    "evaluate": ("Reading", "read_images", "judge_images", "attribute_accuracy", "ATTRIBUTES"),
    "subject": ("TOKEN", "CLASS_WORD", "INSTANCE_PROMPT", "CLASS_PROMPT", "EVAL_PROMPTS", "CLASS_EVAL_PROMPTS",
                "write_instance_images", "instance_images", "read_subject", "subject_renders"),
    "looks": ("Look", "read_look"),
    "subjects": ("Subject", "PROMPT_TYPES"),
    "catalogue": ("SUBJECTS", "get_subject"),
    "metrics": ("Estimate", "subject_fidelity", "prompt_fidelity", "prior_preservation", "diversity",
                "by_prompt_type"),
    "models": ("load_pipeline",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["builtin_path", "load_builtin", *_WHERE]


def builtin_path() -> Path:
    """Folder of the builtin pretrained pipeline shipped as package data (a diffusers folder)."""
    path = Path(__file__).resolve().parent / "builtin"
    if not (path / "model_index.json").is_file():
        raise SdtuneError(
            f"The builtin model is missing from {path}; reinstall sdtune or rebuild it with "
            "`python -m sdtune.toyworld.pretrain --out <that folder>`."
        )
    return path


def load_builtin(device: str = "cpu"):
    """The builtin StableDiffusionPipeline (fp32, progress bar off) on `device`."""
    from sdtune.toyworld.models import load_pipeline

    return load_pipeline(builtin_path(), device)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
