"""Textual Inversion embedding files, read and written bit-exactly (tensors are never cast or reshaped).

One layout family covers nearly every file in the wild:
- one key -> an [N, D] tensor: sdtune and diffusers key it by the token, A1111 and kohya by `emb_params`;
  A1111's convention is that the token is the file stem, so that is the token unless sdtune's metadata
  names it;
- SDXL: `clip_l` (text_encoder) and `clip_g` (text_encoder_2), as .safetensors or as a bare .pt dict
  (A1111 reads only that SDXL form);
- A1111's .pt: string_to_param["*"] beside string_to_token, name, step, sd_checkpoint, sd_checkpoint_name
  (diffusers' load_textual_inversion needs `name`). sdtune adds its run card under "sdtune", which A1111
  and diffusers ignore, so a round trip through .pt keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SdtuneError
from . import Layout, written_names
from .a1111_pickle import write_pt
from .clients import FULLY, Layers, Rule

# Text-encoder component <-> SDXL file key (one table, both directions).
SDXL_KEYS: dict[str, str] = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
COMPONENT_OF_KEY: dict[str, str] = {v: k for k, v in SDXL_KEYS.items()}
KOHYA_KEY = "emb_params"
A1111_KEY = "string_to_param"
_BY_TOKEN = "Textual Inversion (one tensor named by its token)"
_TOKEN_KEY = rf"(?!{KOHYA_KEY}$|{A1111_KEY}\.).+"
# How each client loads an embedding (a whole file; its layer reads "embedding", or "embedding sdxl" for a
# clip_l/clip_g pair): A1111's modules/textual_inversion (Forge keeps it) takes string_to_param, a clip_l/clip_g pair
# or any one-tensor dict from .pt, .bin or .safetensors; ComfyUI's sd1_clip.load_embed the same forms; kohya's
# gen_img the one tensor (inside string_to_param in a .pt); diffusers' load_textual_inversion a one-tensor dict, whose
# key becomes the token, or string_to_param, for one text encoder per call.
_ONE_ENCODER_PER_CALL = Layers("an SDXL pair: one load_textual_inversion call per encoder (clip_g with text_encoder_2 "
                               "and tokenizer_2)", r"\bsdxl\b", "note")
_EVERY_CLIENT = (("a1111", FULLY), ("forge", FULLY), ("comfyui", FULLY), ("kohya", FULLY))
CLIENT_RULES = (*_EVERY_CLIENT, ("diffusers", Rule(exceptions=(_ONE_ENCODER_PER_CALL,))))
KOHYA_CLIENT_RULES = (*_EVERY_CLIENT, ("diffusers", Rule(exceptions=(_ONE_ENCODER_PER_CALL, Layers(
    f"pass token=: the key {KOHYA_KEY} would be the word", r"^embedding$", "note")))))
# The file layouts, in sniffing order. sdtune's and diffusers' files hold one tensor named by the token (any
# name but the fixed ones of kohya's and A1111's forms); an SDXL embedding is clip_l/clip_g in every layout.
LAYOUTS: tuple[Layout, ...] = (
    Layout("sdtune", _BY_TOKEN, keys=_TOKEN_KEY, max_keys=1, clients=CLIENT_RULES),
    Layout("diffusers", _BY_TOKEN, keys=_TOKEN_KEY, max_keys=1, clients=CLIENT_RULES),
    Layout("kohya", "Textual Inversion (kohya / A1111 safetensors)", keys=KOHYA_KEY, clients=KOHYA_CLIENT_RULES),
    Layout("a1111", "Textual Inversion (A1111)", ".pt", keys=rf"{A1111_KEY}\..+", clients=CLIENT_RULES),
    Layout("sdxl", "Textual Inversion (SDXL clip_l/clip_g)", keys="|".join(COMPONENT_OF_KEY), written=False,
           clients=CLIENT_RULES),
    Layout("diffusers-bin", "Textual Inversion (diffusers learned_embeds.bin)", ".bin", keys=".+", max_keys=1,
           written=False, clients=CLIENT_RULES),
)
LAYOUT_NAMES = written_names(LAYOUTS)
SUFFIX = {layout.name: layout.suffix for layout in LAYOUTS if layout.written}
GENERIC_KEYS = (KOHYA_KEY, "*")  # single-file keys that name no token
TOKEN_METADATA = "textual-inversion_token"  # run-card field naming the token (method metadata, prefixed)
SDTUNE_PT_KEY = "sdtune"
A1111_STAR_ID = 265  # CLIP's id of "*", which A1111 writes in string_to_token
# A1111 .pt field <-> sdtune run-card field.
A1111_FIELDS: dict[str, str] = {"step": "steps", "sd_checkpoint": "base_hash", "sd_checkpoint_name": "base_model"}
A1111_INT_FIELDS = ("step",)
PEEK_BYTES = 4 << 20  # .pt files up to this size are opened to learn their names; embeddings are far smaller


@dataclass
class Embedding:
    """Learned vectors per text-encoder component ({"text_encoder": [N, D], ...}), the token, the run card."""

    token: str
    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def _is_vectors(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() in (1, 2) and value.is_floating_point() and value.numel() > 0


def detect(obj: Any) -> str | None:
    """'a1111', 'sdxl' or 'single' for an embedding (a loaded file), None for anything else."""
    if not isinstance(obj, Mapping) or not obj:
        return None
    if A1111_KEY in obj:
        params = obj[A1111_KEY]
        ok = isinstance(params, Mapping) and len(params) == 1 and _is_vectors(next(iter(params.values())))
        return "a1111" if ok else None
    if set(obj) == set(COMPONENT_OF_KEY) and all(_is_vectors(v) for v in obj.values()):
        return "sdxl"
    if len(obj) == 1 and _is_vectors(next(iter(obj.values()))):
        return "single"
    return None


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A1111 and diffusers accept a bare [D] vector as one row."""
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def read_embedding(obj: Any, metadata: Mapping[str, str], stem: str) -> Embedding:
    """A loaded embedding file -> Embedding; the token is sdtune's metadata, else the file stem."""
    layout = detect(obj)
    if layout is None:
        raise SdtuneError(f"{stem} is not a Textual Inversion embedding (expected one [N, D] tensor, "
                          "clip_l/clip_g, or an A1111 string_to_param file).")
    meta = dict(metadata)
    if layout == "a1111":
        meta = {**_a1111_metadata(obj), **meta}
        vectors = {"text_encoder": _as_rows(next(iter(obj["string_to_param"].values())))}
    elif layout == "sdxl":
        vectors = {component: _as_rows(obj[key]) for component, key in SDXL_KEYS.items()}
        if vectors["text_encoder"].shape[0] != vectors["text_encoder_2"].shape[0]:
            raise SdtuneError(f"{stem} has {vectors['text_encoder'].shape[0]} clip_l but "
                              f"{vectors['text_encoder_2'].shape[0]} clip_g vectors; the file is damaged.")
    else:
        vectors = {"text_encoder": _as_rows(next(iter(obj.values())))}
    token = meta.get(TOKEN_METADATA) or stem
    return Embedding(token, vectors, {**meta, TOKEN_METADATA: token})


def _a1111_metadata(obj: Mapping) -> dict[str, str]:
    """The run card stored in an A1111 .pt: sdtune's own, completed by A1111's step/checkpoint fields."""
    card = obj.get(SDTUNE_PT_KEY)
    meta = {str(k): str(v) for k, v in card.items()} if isinstance(card, Mapping) else {}
    for a1111_field, card_field in A1111_FIELDS.items():
        if obj.get(a1111_field) is not None and card_field not in meta:
            meta[card_field] = str(obj[a1111_field])
    return meta


def encode_embedding(emb: Embedding, layout: str) -> dict[str, Any]:
    """Embedding -> the object written to disk in `layout` (tensors passed through untouched)."""
    if layout not in LAYOUT_NAMES:
        raise SdtuneError(f"An embedding is written as {', '.join(LAYOUT_NAMES)}, not {layout}.")
    if set(emb.vectors) == set(SDXL_KEYS):
        return {key: emb.vectors[component] for component, key in SDXL_KEYS.items()}
    if set(emb.vectors) != {"text_encoder"}:
        raise SdtuneError(f"Cannot write vectors for {', '.join(sorted(emb.vectors))} as an embedding file.")
    vectors = emb.vectors["text_encoder"]
    if layout == "kohya":
        return {KOHYA_KEY: vectors}
    if layout != "a1111":
        return {emb.token: vectors}
    pt: dict[str, Any] = {"string_to_token": {"*": A1111_STAR_ID}, "string_to_param": {"*": vectors},
                          "name": emb.token}
    for a1111_field, card_field in A1111_FIELDS.items():
        value = emb.metadata.get(card_field)
        if value is not None and a1111_field in A1111_INT_FIELDS:
            value = int(value) if value.lstrip("-").isdigit() else None
        pt[a1111_field] = value
    pt[SDTUNE_PT_KEY] = dict(sorted(emb.metadata.items()))  # one order, whatever the source: same bytes
    return pt


def write_embedding(path: Path, emb: Embedding, layout: str) -> Path:
    """Write `emb` atomically at `path` in `layout`; the suffix must be the layout's (.pt for a1111)."""
    from ..artifacts import save_artifact

    path = Path(path)
    if layout in SUFFIX and path.suffix.lower() != SUFFIX[layout]:
        raise SdtuneError(f"The {layout} embedding layout is a {SUFFIX[layout]} file; "
                          f"name the output {path.stem}{SUFFIX[layout]}.")
    vectors = {k: v.detach().cpu().contiguous().clone() for k, v in emb.vectors.items()}
    clean = Embedding(emb.token, vectors, {**emb.metadata, TOKEN_METADATA: emb.token})
    obj = encode_embedding(clean, layout)
    if layout != "a1111":
        return save_artifact(path, obj, clean.metadata)
    return write_pt(path, obj)


def file_names(path: Path) -> list[str]:
    """The words a file in an artifact folder answers to as an embedding ([] when it is no embedding):
    sdtune's token, a single key that names a token (diffusers), the file stem. Only headers and small
    pickles are read; an unreadable pickle answers to its stem, so naming it reports why it is unreadable."""
    from safetensors import SafetensorError, safe_open

    from ..artifacts import load_artifact

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys, metadata = list(f.keys()), dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError):
            return [path.stem]
        if not (len(keys) == 1 or set(keys) == set(COMPONENT_OF_KEY)):
            return []
    else:
        if path.stat().st_size > PEEK_BYTES:
            return [path.stem]
        try:
            obj, metadata = load_artifact(path)
        except SdtuneError:
            return [path.stem]
        if detect(obj) is None:
            return []
        keys = list(obj)
        metadata = _a1111_metadata(obj) if detect(obj) == "a1111" else metadata
    names = [metadata.get(TOKEN_METADATA, "")]
    if len(keys) == 1 and keys[0] not in GENERIC_KEYS:
        names.append(keys[0])
    names.append(path.stem)
    return [n for n in dict.fromkeys(names) if n]
