"""The LoRA family as the LyCORIS layout stores it — LoRA/LoCon, LoHa, LoKr, each optionally with DoRA — as pure
tensor code: which parameters each algorithm has, how one module's parameters are checked, and the weight update
each means, with the formulas the web UIs apply (A1111 extensions-builtin/Lora network_lora.py, network_hada.py,
network_lokr.py and network.py NetworkModule; ComfyUI comfy/weight_adapter/lora.py, loha.py, lokr.py and base.py
weight_decompose; LyCORIS lycoris/functional/loha.py, lokr.py, locon.py and general.py weight_decompose):

  LoRA   ΔW = up · down (a conv `down` flattened to [r, in·kh·kw]; with a Tucker core `mid`:
         einsum("n m k l, i n, m j -> i j k l", mid, up, down)), scale = alpha / rank, rank = down's first dim
  LoHa   ΔW = (w1a · w1b) ⊙ (w2a · w2b) (Tucker: each factor einsum("i j k l, j r, i p -> p r k l", t, wb, wa)),
         scale = alpha / w1b's first dim
  LoKr   ΔW = kron(w1, w2), w1 = w1a · w1b when split, w2 = w2a · w2b or the Tucker rebuild of (t2, w2a, w2b);
         scale = alpha / rank where rank is w2b's first dim if w2 is split, else w1b's if w1 is split, else the
         scale is 1 whatever alpha says (A1111's and ComfyUI's rule; LyCORIS writes alpha = its dim there;
         peft's LoKr layer scales it by alpha/r all the same, so a trainer folds alpha/r into lokr_w1)
  DoRA   with `dora_scale` m: W1 = W0 + scale·ΔW, D = m · W1 / ‖W1‖ (the norm over every axis but m's),
         and at strength s the layer becomes W0 + s·(D − W0) (A1111 and ComfyUI; s = 0 is the base exactly).
Without DoRA a layer at strength s becomes W0 + s·scale·ΔW. A missing alpha means scale 1.

`dora_scale` records its axis in its shape, as LyCORIS writes it: [out, 1, …] scales each output feature (peft's
DoRA, LyCORIS's default wd_on_out), [1, in, …] each input feature (A1111's only axis, LyCORIS wd_on_out=False).
The kohya reader takes a 1-D dora_scale (peft's magnitude written as is) as [out, 1, ...].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..errors import SdtuneError

Params = Mapping[str, torch.Tensor]

# Each algorithm's parameters under sdtune's canonical names (LoHa/LoKr: the LyCORIS and peft names).
ALGORITHM_PARAMS: dict[str, tuple[str, ...]] = {
    "LoRA": ("lora_A.weight", "lora_B.weight", "lora_mid.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
SHARED_PARAMS = ("alpha", "dora_scale")
MAGNITUDE = "lora_magnitude_vector"  # peft's (and the diffusers layout's) name for DoRA's magnitude
# What each algorithm's module must hold: per slot, the alternative sets of parameters that fill it.
REQUIRED: dict[str, tuple[tuple[tuple[str, ...], ...], ...]] = {
    "LoRA": ((("lora_A.weight", "lora_B.weight"),),),
    "LoHa": ((("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),),
    "LoKr": ((("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")), (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))),
}
_KOHYA_RENAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# Canonical parameter name <-> kohya/LyCORIS file suffix (one table, both directions).
KOHYA_PARAMS: dict[str, str] = {p: _KOHYA_RENAMES.get(p, p)
                                for p in (*SHARED_PARAMS, *(q for ps in ALGORITHM_PARAMS.values() for q in ps))}
CANONICAL_PARAMS: dict[str, str] = {v: k for k, v in KOHYA_PARAMS.items()}
# Suffixes of LyCORIS algorithms sdtune does not apply, named in the refusal.
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "boft_blocks": "BOFT", "diff": "full (diff)",
    "diff_b": "full (diff)", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "w_norm": "norm", "b_norm": "norm", "scale": "scaled LoRA", "lora_up.bias": "LoRA with bias",
    "bias_indices": "LoRA with bias", "bias_values": "LoRA with bias", "bias_size": "LoRA with bias",
}


def param_of(key: str, params: Iterable[str]) -> str | None:
    """The longest of `params` that `key` ends with after a '.', or None."""
    found = [p for p in params if key.endswith("." + p)]
    return max(found, key=len) if found else None


def algorithm(params: Iterable[str]) -> str:
    """'LoRA', 'LoHa' or 'LoKr' by a module's parameter names; raises ValueError for none or several."""
    names = set(params) - set(SHARED_PARAMS)
    found = [a for a, own in ALGORITHM_PARAMS.items() if names & set(own)]
    if len(found) != 1 or names - set(ALGORITHM_PARAMS[found[0]]):
        raise ValueError(sorted(names))
    return found[0]


def _filled(algo: str, names: set[str]) -> bool:
    """Every slot of the algorithm filled by exactly one of its alternatives."""
    return all(sum(set(alt) <= names for alt in slot) == 1 for slot in REQUIRED[algo])


def check_module(label: str, params: Params) -> str:
    """The module's algorithm, or a one-line refusal naming `label` when its parameters are incomplete, mixed,
    not floating, or of shapes that make no update."""
    try:
        algo = algorithm(params)
    except ValueError as exc:
        raise SdtuneError(f"{label} mixes or lacks LoRA/LoHa/LoKr parameters ({', '.join(exc.args[0]) or 'none'}); "
                          "the file is damaged, re-export it.") from None
    if not _filled(algo, set(params)):
        raise SdtuneError(f"{label} lacks parameters of its {algo} update (has {', '.join(sorted(params))}); the "
                          "file is incomplete.")
    alpha = params.get("alpha")
    fine = all(t.is_floating_point() for t in params.values()) and (
        alpha is None or (alpha.numel() == 1 and bool(alpha.float().isfinite().all())))
    if not fine or update_shape(params) is None or not _dora_shape_ok(params.get("dora_scale")):
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(params.items()) if k != "alpha")
        raise SdtuneError(f"{label} has malformed weights ({shapes}); the file is damaged, re-export it.")
    return algo


def _dora_shape_ok(scale: torch.Tensor | None) -> bool:
    return scale is None or (scale.ndim >= 2 and min(scale.shape[:2]) == 1 and all(d == 1 for d in scale.shape[2:])
                             and scale.numel() >= 1)


# ------------------------------------------------------------------------------------------ shapes


def _shape(params: Params, name: str) -> tuple[int, ...] | None:
    tensor = params.get(name)
    return tuple(tensor.shape) if tensor is not None else None


def _lora_shape(p: Params) -> tuple[int, ...] | None:
    down, up, mid = _shape(p, "lora_A.weight"), _shape(p, "lora_B.weight"), _shape(p, "lora_mid.weight")
    if (len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or down[0] < 1
            or up[2:] not in ((), (1, 1))):
        return None
    if mid is None:
        return (up[0], math.prod(down[1:]))
    if len(mid) != 4 or len(down) != 4 or down[2:] != (1, 1) or mid[:2] != (up[1], down[0]):
        return None
    return (up[0], down[1], *mid[2:])


def _tucker_shape(t: tuple[int, ...], wa: tuple[int, ...], wb: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of einsum("i j k l, j r, i p -> p r k l", t, wb, wa)."""
    if len(t) != 4 or len(wa) != 2 or len(wb) != 2 or t[0] != wa[0] or t[1] != wb[0]:
        return None
    return (wa[1], wb[1], *t[2:])


def _product_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of a · b.reshape(len(b), -1) (A1111's rebuild_conventional)."""
    if len(a) != 2 or len(b) not in (2, 4) or a[1] != b[0] or a[1] < 1:
        return None
    return (a[0], math.prod(b[1:]))


def _loha_shape(p: Params) -> tuple[int, ...] | None:
    halves = []
    for i in (1, 2):
        wa, wb, t = _shape(p, f"hada_w{i}_a"), _shape(p, f"hada_w{i}_b"), _shape(p, f"hada_t{i}")
        halves.append(_tucker_shape(t, wa, wb) if t is not None else _product_shape(wa, wb))
    if (_shape(p, "hada_t1") is None) != (_shape(p, "hada_t2") is None):
        return None
    return halves[0] if halves[0] is not None and halves[0] == halves[1] else None


def _lokr_factor(p: Params, i: int) -> tuple[int, ...] | None:
    full, wa, wb, t = (_shape(p, f"lokr_w{i}"), _shape(p, f"lokr_w{i}_a"), _shape(p, f"lokr_w{i}_b"),
                       _shape(p, f"lokr_t{i}") if i == 2 else None)
    if full is not None:
        return full if len(full) in (2, 4) and (i == 2 or len(full) == 2) else None
    if t is not None:
        return _tucker_shape(t, wa, wb)
    return _product_shape(wa, wb)


def _lokr_shape(p: Params) -> tuple[int, ...] | None:
    w1, w2 = _lokr_factor(p, 1), _lokr_factor(p, 2)
    if w1 is None or w2 is None or ("lokr_t2" in p and "lokr_w2" in p):
        return None
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


_SHAPES = {"LoRA": _lora_shape, "LoHa": _loha_shape, "LoKr": _lokr_shape}


def update_shape(params: Params) -> tuple[int, ...] | None:
    """Shape of ΔW as its formula builds it ([out, in·kh·kw] or [out, in, kh, kw]), None if the shapes clash."""
    try:
        return _SHAPES[algorithm(params)](params)
    except (ValueError, TypeError, IndexError):
        return None


def rank(params: Params) -> int | None:
    """The rank `alpha` is divided by (see the module docstring); None where the scale is 1 (LoKr, no split)."""
    algo = algorithm(params)
    if algo == "LoRA":
        return int(params["lora_A.weight"].shape[0])
    if algo == "LoHa":
        return int(params["hada_w1_b"].shape[0])
    split = next((params[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in params), None)
    return int(split.shape[0]) if split is not None else None


def scale(params: Params) -> float:
    """alpha / rank, or 1 without an alpha or a rank."""
    alpha, r = params.get("alpha"), rank(params)
    return float(alpha.item()) / r if alpha is not None and r else 1.0


def input_width(params: Params) -> int | None:
    """Input width of a linear layer's update, from its input-side factor where it has one (the text-context
    width of cross-attention keys/values, read even from a file that lacks other parameters)."""
    down = params.get("lora_A.weight", params.get("hada_w1_b"))
    if down is not None:
        return int(down.shape[1]) if down.ndim == 2 else None
    shape = update_shape(params)
    return shape[1] if shape is not None and len(shape) == 2 else None


# ------------------------------------------------------------------------------------------ values


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.reshape(b.shape[0], -1)


def _lora_delta(p: Params) -> torch.Tensor:
    up, down = p["lora_B.weight"], p["lora_A.weight"]
    if "lora_mid.weight" in p:
        return torch.einsum("n m k l, i n, m j -> i j k l", p["lora_mid.weight"], up.flatten(1), down.flatten(1))
    return _product(up.flatten(1), down)


def _loha_delta(p: Params) -> torch.Tensor:
    halves = [_tucker(p[f"hada_t{i}"], p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]) if f"hada_t{i}" in p
              else _product(p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]) for i in (1, 2)]
    return halves[0] * halves[1]


def _lokr_factor_value(p: Params, i: int) -> torch.Tensor:
    if f"lokr_w{i}" in p:
        return p[f"lokr_w{i}"]
    if f"lokr_t{i}" in p:
        return _tucker(p[f"lokr_t{i}"], p[f"lokr_w{i}_a"], p[f"lokr_w{i}_b"])
    return _product(p[f"lokr_w{i}_a"], p[f"lokr_w{i}_b"])


def _lokr_delta(p: Params) -> torch.Tensor:
    w1, w2 = _lokr_factor_value(p, 1), _lokr_factor_value(p, 2)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: an einsum result may not fit


_DELTAS = {"LoRA": _lora_delta, "LoHa": _loha_delta, "LoKr": _lokr_delta}


def delta_weight(params: Params, like: torch.Tensor) -> torch.Tensor:
    """scale·ΔW in float32, shaped as the layer weight `like` (checked with `fits` first)."""
    p = {k: v.to(like.device, torch.float32) for k, v in params.items() if k not in SHARED_PARAMS}
    return (_DELTAS[algorithm(params)](p) * scale(params)).reshape(like.shape)


def dora_axis(dora_scale: torch.Tensor) -> int:
    """0 when `dora_scale` holds one magnitude per output feature, 1 per input feature (its shape says)."""
    return 1 if dora_scale.shape[0] == 1 and dora_scale.shape[1] > 1 else 0


def fits(params: Params, weight_shape: tuple[int, ...]) -> bool:
    """Whether the update (and its dora_scale) has the layer's shape: the same, or [out, in·kh·kw]."""
    shape = update_shape(params)
    if shape is None or shape[0] != weight_shape[0] or math.prod(shape) != math.prod(weight_shape):
        return False
    if shape != tuple(weight_shape) and len(shape) != 2:
        return False
    dora = params.get("dora_scale")
    return dora is None or dora.shape[dora_axis(dora)] == weight_shape[dora_axis(dora)]


def merged_weight(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """The layer's weight with the update applied at `strength`, computed in float32, in the weight's dtype."""
    base = weight.detach().float()
    delta = delta_weight(params, base)
    dora = params.get("dora_scale")
    if dora is None:
        return (base + strength * delta).to(weight.dtype)
    updated = base + delta
    axis = dora_axis(dora)
    other = [d for d in range(updated.ndim) if d != axis]
    magnitude = dora.to(base.device, torch.float32).reshape([-1 if d == axis else 1 for d in range(updated.ndim)])
    decomposed = updated * (magnitude / torch.linalg.vector_norm(updated, dim=other, keepdim=True))
    return (base + strength * (decomposed - base)).to(weight.dtype)
