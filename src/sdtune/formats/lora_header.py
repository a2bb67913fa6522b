"""The `lora_adapter_metadata` header diffusers writes beside PEFT LoRA weights: each component's peft
LoraConfig fields as JSON ("unet.lora_alpha", "text_encoder.alpha_pattern", ...). A damaged or hostile
header is refused here, by field, before the LoRA decoder relies on its types."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import SdtuneError

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
NUMBER_FIELDS = ("r", "lora_alpha")
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")  # {module-name regex: number}
MAX_PATTERN_CHARS = 512  # peft writes module names (a few dozen characters), maybe escaped
# A repeated group such as "(a+)+" can make matching a module name take exponential time, and many
# unbounded repeats (".*.*.*.*...") polynomial time of a high degree: a file that hangs the loader. peft's
# own patterns are module names, at most with a wildcard or two.
REPEATED_GROUP = re.compile(r"(?<!\\)\)[*+{]")
UNBOUNDED_REPEAT = re.compile(r"(?<!\\)[*+]")
MAX_UNBOUNDED_REPEATS = 3


def checked_adapter_header(packed: Any) -> dict[str, Any]:
    """The decoded header, if it is an object whose number and pattern fields hold what peft writes."""
    if not isinstance(packed, dict):
        raise SdtuneError(f"LoRA metadata '{LORA_ADAPTER_METADATA_KEY}' is {json.dumps(packed)[:40]}, not a JSON "
                          "object; re-export the file.")
    for key, value in packed.items():
        if not _fits(key.partition(".")[2], value):
            raise SdtuneError(f"LoRA metadata '{LORA_ADAPTER_METADATA_KEY}' field {key!r} holds {value!r:.60}, which "
                              "peft never writes; re-export the file.")
    return packed


def _fits(field: str, value: Any) -> bool:
    if field in NUMBER_FIELDS:
        return _number(value)
    if field in PATTERN_FIELDS:
        return isinstance(value, dict) and all(_regex(k) and _number(v) for k, v in value.items())
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(pattern: str) -> bool:
    if (len(pattern) > MAX_PATTERN_CHARS or REPEATED_GROUP.search(pattern)
            or len(UNBOUNDED_REPEAT.findall(pattern)) > MAX_UNBOUNDED_REPEATS):
        return False
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True
