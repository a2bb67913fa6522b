"""Hypernetwork files as pure data: the AUTOMATIC1111 `.pt` layout and sdtune's safetensors form.

Both read into one `HypernetworkFile`: tensors under canonical keys `<width>.<k|v>.<module key>` (the
module key as A1111's `HypernetworkModule.state_dict()` spells it, e.g. `linear.2.weight`), the file's
other A1111 entries (`layer_structure`, `activation_func`, ...) exactly as stored, and sdtune's run card.
Writers order everything the same way, so write -> read -> write is bit-exact in either form and a
conversion carries every tensor and entry unchanged. No modules are built here (see sdtune.hypernet_modules).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SdtuneError
from . import Layout
from .a1111_pickle import pt_bytes
from .clients import FULLY, Rule

SIDES = ("k", "v")
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
# Keys of the first hypernetwork files (two plain Linears), renamed on read as A1111's fix_old_state_dict does.
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
# The run card travels inside a .pt under this key; A1111 and ComfyUI skip keys that are not widths.
PT_CARD_KEY = "sdtune_metadata"
# safetensors header keys derived from the file itself (rewritten on every write, never copied).
META_ENTRIES = "hypernetwork_a1111"
META_WIDTHS = "hypernetwork_widths"  # "768, 320, 640, 1280": the file's width order
META_PREFIX = "hypernetwork_"
CANONICAL_KEY = re.compile(r"^(?P<width>\d+)\.(?P<side>[kv])\.linear\.(?P<index>\d+)\.(?P<param>weight|bias)$")
# How each client loads a hypernetwork: A1111's modules/hypernetworks (Forge keeps it) lists `*.pt` files and reads
# integer width keys; ComfyUI's HypernetworkLoader (comfy_extras/nodes_hypernetwork.py) reads the same width keys;
# kohya's scripts and diffusers load no hypernetworks.
_NO_HYPERNETWORKS = (("kohya", Rule(refuses="its scripts load no hypernetworks")),
                     ("diffusers", Rule(refuses="it has no hypernetwork loader")))
_PT_ONLY = Rule(refuses="it lists hypernetworks as .pt files only; convert --to a1111")
PT_CLIENTS = (("a1111", FULLY), ("forge", FULLY), ("comfyui", FULLY), *_NO_HYPERNETWORKS)
SAFETENSORS_CLIENTS = (("a1111", _PT_ONLY), ("forge", _PT_ONLY),
                       ("comfyui", Rule(refuses="its HypernetworkLoader reads A1111's width-keyed layout; "
                                                "convert --to a1111")),
                       *_NO_HYPERNETWORKS)
# The file layouts, in sniffing order: sdtune's canonical keys, then A1111's (a width, then the pair's index).
LAYOUTS: tuple[Layout, ...] = (
    Layout("sdtune", "Hypernetwork (sdtune)", keys=CANONICAL_KEY.pattern.strip("^$"), clients=SAFETENSORS_CLIENTS),
    Layout("a1111", "Hypernetwork (A1111 layout)", ".pt", keys=r"\d+\..+", clients=PT_CLIENTS),
)


@dataclass(frozen=True)
class Structure:
    """How every module's layer sequence is built; `from_entries` fills what a file lacks as A1111 does."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = None
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    activate_output: bool = True
    dropout_structure: tuple[float, ...] = (0, 0, 0)

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any]) -> "Structure":
        layers = tuple(_sequence(entries, "layer_structure") or (1, 2, 1))
        use_dropout = entries.get("use_dropout", False)
        dropout = _sequence(entries, "dropout_structure")
        if dropout is None:
            dropout = legacy_dropout(layers, bool(use_dropout), bool(entries.get("last_layer_dropout", False)))
        structure = cls(layers, entries.get("activation_func"), bool(entries.get("is_layer_norm", False)),
                        entries.get("weight_initialization") or "Normal", bool(entries.get("activate_output", True)),
                        tuple(dropout))
        structure.check()
        return structure

    def check(self) -> None:
        """Refuse a structure A1111 could not build, in one sentence."""
        ls = self.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(not _number(x) or x <= 0 for x in ls):
            raise SdtuneError(f"Layer structure {list(ls)} is invalid; it must start and end with 1 and hold only "
                              "positive numbers, e.g. 1,2,1.")
        if len(self.dropout_structure) != len(ls):
            raise SdtuneError(f"Dropout structure {list(self.dropout_structure)} must have one value per entry of "
                              f"the layer structure {list(ls)}.")
        if any(not _number(p) or not 0 <= p < 1 for p in self.dropout_structure):
            raise SdtuneError(f"Dropout structure {list(self.dropout_structure)} must hold probabilities in [0, 1).")
        if self.activation_func is not None and not isinstance(self.activation_func, str):
            raise SdtuneError(f"Activation {self.activation_func!r} is not a name such as relu or linear.")

    def widths(self, dim: int) -> list[int]:
        """Feature width before and after each Linear of a module of width `dim`."""
        return [int(dim * x) for x in self.layer_structure]


def _sequence(entries: Mapping[str, Any], key: str) -> list | tuple | None:
    """A list entry of a file (None when absent); any other type is refused by name."""
    value = entries.get(key)
    if value is not None and not isinstance(value, (list, tuple)):
        raise SdtuneError(f"Hypernetwork entry '{key}' is {value!r:.40}, not a list of numbers such as [1, 2, 1]; "
                          "the file is damaged.")
    return value


def legacy_dropout(layer_structure: tuple, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's dropout pattern for files without `dropout_structure`: 0.3 after hidden layers when enabled
    (after the last hidden one only with last_layer_dropout); cut to one value per layer-structure entry."""
    n = len(layer_structure)
    if not use_dropout:
        return [0] * n
    return ([0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0] + [0])[:n]


@dataclass
class HypernetworkFile:
    """One hypernetwork: canonical tensors, A1111 entries (JSON-able, file order) and the sdtune run card."""

    tensors: dict[str, torch.Tensor]
    entries: dict[str, Any] = field(default_factory=dict)
    card: dict[str, str] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return list(dict.fromkeys(int(key.split(".", 1)[0]) for key in self.tensors))

    @property
    def structure(self) -> Structure:
        return Structure.from_entries(self.entries)

    @property
    def param_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def side(self, width: int, side: str) -> "OrderedDict[str, torch.Tensor]":
        """One module's state dict, keys as A1111 writes them."""
        prefix = f"{width}.{side}."
        return OrderedDict((k[len(prefix):], v) for k, v in self.tensors.items() if k.startswith(prefix))


def run_card(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The run-card part of a header: without `method` and the `hypernetwork_*` keys derived from the file."""
    return {str(k): str(v) for k, v in metadata.items() if k != "method" and not str(k).startswith(META_PREFIX)}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sort_key(key: str, widths: list[int]) -> tuple:
    match = CANONICAL_KEY.match(key)
    if not match:
        raise SdtuneError(f"'{key}' is not a hypernetwork weight key (expected WIDTH.k|v.linear.N.weight|bias).")
    return (widths.index(int(match["width"])), SIDES.index(match["side"]), int(match["index"]),
            match["param"] != "weight")


def canonical_order(tensors: Mapping[str, torch.Tensor], widths: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Tensors ordered by width (given order, else ascending), k before v, layer index, weight before bias."""
    found = sorted({int(k.split(".", 1)[0]) for k in tensors if k.split(".", 1)[0].isdigit()})
    order = [w for w in (widths or []) if w in found] + [w for w in found if w not in (widths or [])]
    return {k: tensors[k] for k in sorted(tensors, key=lambda k: _sort_key(k, order))}


def _plain(value: Any, where: str) -> Any:
    """A file entry as JSON-able data (tuples become lists); anything else is refused by name."""
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise SdtuneError(f"Hypernetwork entry '{where}' holds a {type(value).__name__}, which sdtune cannot keep; "
                      "re-save the file without it.")


# A1111 .pt layout ----------------------------------------------------------------------------------------------

def looks_like_a1111(obj: Any) -> bool:
    """True for a loaded pickle shaped like an A1111 hypernetwork: int width -> (k dict, v dict)."""
    if not isinstance(obj, Mapping):
        return False
    pairs = [v for k, v in obj.items() if isinstance(k, int) and not isinstance(k, bool)]
    return bool(pairs) and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, Mapping) for s in p)
                               for p in pairs)


def from_a1111(obj: Any) -> HypernetworkFile:
    """A loaded A1111 hypernetwork dict -> HypernetworkFile (old `linear1`/`linear2` keys renamed)."""
    if not looks_like_a1111(obj):
        raise SdtuneError("Not an A1111 hypernetwork: it needs integer width keys, each holding a (k, v) pair of "
                          "state dicts.")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    card: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(key, int) and not isinstance(key, bool):
            for side, state in zip(SIDES, value):
                for name, tensor in state.items():
                    if not isinstance(tensor, torch.Tensor):
                        raise SdtuneError(f"Hypernetwork entry {key}.{side}.{name} is not a tensor.")
                    tensors[f"{key}.{side}.{OLD_KEYS.get(name, name)}"] = tensor
        elif key == PT_CARD_KEY and isinstance(value, Mapping):
            card = run_card(value)
        elif isinstance(key, str):
            entries[key] = _plain(value, key)
        else:
            raise SdtuneError(f"Hypernetwork file has a key {key!r} that is neither a width nor a field name.")
    return HypernetworkFile(canonical_order(tensors, [k for k in obj if isinstance(k, int)]), entries, card)


def to_a1111(hf: HypernetworkFile) -> dict:
    """HypernetworkFile -> the dict A1111 pickles: widths first, then its entries, then the run card."""
    tensors = canonical_order(hf.tensors, hf.widths)
    ordered = HypernetworkFile(tensors, hf.entries, hf.card)
    out: dict[Any, Any] = {w: (ordered.side(w, "k"), ordered.side(w, "v")) for w in ordered.widths}
    out.update(hf.entries)
    card = run_card(hf.card)
    if card:
        out[PT_CARD_KEY] = dict(sorted(card.items()))
    return out


def a1111_bytes(hf: HypernetworkFile) -> bytes:
    """The .pt file's bytes, as A1111's safety check accepts them (see a1111_pickle)."""
    return pt_bytes(to_a1111(hf))


# sdtune safetensors form ---------------------------------------------------------------------------------------

def summary(hf: HypernetworkFile) -> dict[str, str]:
    """What `sdtune inspect` shows about a hypernetwork (header keys without the `hypernetwork_` prefix)."""
    s = hf.structure
    return {
        "layer_structure": _listed(s.layer_structure),
        "activation": s.activation_func or "linear",
        "layer_norm": str(s.is_layer_norm).lower(),
        "dropout_structure": _listed(s.dropout_structure),
        "activate_output": str(s.activate_output).lower(),
        "weight_init": s.weight_initialization,
        "widths": _listed(hf.widths),
        "param_count": str(hf.param_count),
    }


def _listed(values) -> str:
    return ", ".join(str(v) for v in values)


def to_safetensors(hf: HypernetworkFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HypernetworkFile -> (tensors, header): the run card plus the entries and widths needed to rebuild it."""
    derived = {f"{META_PREFIX}{k}": v for k, v in summary(hf).items()}
    derived[META_ENTRIES] = json.dumps(hf.entries)
    return canonical_order(hf.tensors, hf.widths), {**run_card(hf.card), "method": "hypernetwork", **derived}


def looks_like_sdtune(tensors: Any, metadata: Mapping[str, str]) -> bool:
    if not isinstance(tensors, Mapping) or not tensors:
        return False
    if metadata.get("method") == "hypernetwork":
        return True
    return all(isinstance(k, str) and CANONICAL_KEY.match(k) for k in tensors)


def from_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> HypernetworkFile:
    """(tensors, header) of an sdtune hypernetwork -> HypernetworkFile; a missing header means A1111 defaults."""
    try:
        entries = json.loads(metadata.get(META_ENTRIES, "{}"))
        widths = [int(w) for w in metadata.get(META_WIDTHS, "").strip("[]").split(",") if w.strip()]
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise SdtuneError(f"The hypernetwork header is damaged ({exc}); convert the file again from its source.") \
            from exc
    if not isinstance(entries, dict):
        raise SdtuneError("The hypernetwork header entry 'hypernetwork_a1111' must be a JSON object.")
    card = run_card(metadata)
    if not tensors:
        raise SdtuneError("The file holds no hypernetwork weights.")
    return HypernetworkFile(canonical_order(dict(tensors), widths), entries, card)


def read(obj: Any, metadata: Mapping[str, str], what: str = "file") -> HypernetworkFile:
    """Either form, as load_artifact returned it, -> HypernetworkFile (or a clear refusal)."""
    if looks_like_a1111(obj):
        return from_a1111(obj)
    if looks_like_sdtune(obj, metadata) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return from_safetensors(obj, metadata)
    raise SdtuneError(f"{what} is not a hypernetwork (neither the A1111 .pt layout nor sdtune's safetensors form).")
