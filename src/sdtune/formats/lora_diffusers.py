"""LoRA state dicts between sdtune's canonical keys and the diffusers/PEFT layout that diffusers'
`load_lora_weights` reads: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, DoRA's
`.lora_magnitude_vector`, and each component's peft LoraConfig (rank, alpha, patterns, use_dora) in the
`lora_adapter_metadata` header. peft's LoRA layer holds LoRA and DoRA with one magnitude per output feature
(a linear layer's magnitude is [out], a convolution's [1, out, 1, 1]); anything else is refused by name.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import SdtuneError
from .lora import (CLIP_FILE_PREFIX, COMPONENTS, Modules, file_path, group_modules, live_path, module_alpha,
                   module_rank, not_in_model, ungroup_modules)
from .lora_header import LORA_ADAPTER_METADATA_KEY, checked_adapter_header
from .lycoris import MAGNITUDE, algorithm, dora_axis, param_of

# transformers >= 5's adapter loader, which diffusers uses for text encoders, renames peft's bare magnitude key
# to `lora_magnitude_vector.<adapter>` and so never loads it (the parameter is `<adapter>.weight`); the key with
# `.weight` loads there and in peft's own set_peft_model_state_dict, which the UNet goes through.
MAGNITUDE_KEYS = {"unet": MAGNITUDE, "text_encoder": f"{MAGNITUDE}.weight", "text_encoder_2": f"{MAGNITUDE}.weight"}
PEFT_PARAMS = ("lora_A.weight", "lora_B.weight", MAGNITUDE, f"{MAGNITUDE}.weight")
CONVERT_TO_KOHYA = "convert it to kohya (or sdtune) instead"


def _pattern(component: str, path: str) -> str:
    """A peft rank/alpha pattern key matching exactly this module (text encoders with or without `text_model.`)."""
    return re.escape(path.removeprefix(CLIP_FILE_PREFIX) if component != "unet" else path)


def _target(component: str, path: str) -> str:
    """A peft target_modules entry; peft matches it as the full name or a `.`-separated suffix."""
    return path.removeprefix(CLIP_FILE_PREFIX) if component != "unet" else path


def _lora_config(component: str, modules: Modules) -> dict[str, Any]:
    """peft LoraConfig fields for one component: commonest rank/alpha plus per-module patterns."""
    own = {path: params for (c, path), params in modules.items() if c == component}
    ranks = {path: module_rank(p) for path, p in own.items()}
    alphas = {path: module_alpha(p) for path, p in own.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(_target(component, p) for p in own),
        "rank_pattern": {_pattern(component, p): v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {_pattern(component, p): v for p, v in sorted(alphas.items()) if v != alpha},
        "use_rslora": False,
        "use_dora": any("dora_scale" in p for p in own.values()),
        "lora_bias": False,
    }


def _check_peft_holds(modules: Modules) -> None:
    """Refuse what peft's LoRA layer cannot hold, naming the module and the target's limits."""
    dora = {}
    for (component, path), params in modules.items():
        algo = algorithm(params)
        if algo != "LoRA" or "lora_mid.weight" in params:
            kind = algo if algo != "LoRA" else "LoCon with a Tucker core (lora_mid)"
            raise SdtuneError(f"diffusers' LoRA loader holds LoRA and DoRA, not {kind} ({component}.{path}); "
                              f"{CONVERT_TO_KOHYA}.")
        if "dora_scale" in params and dora_axis(params["dora_scale"]) != 0:
            raise SdtuneError(f"diffusers/PEFT DoRA scales each output feature, but {component}.{path} scales each "
                              f"input feature (A1111's axis); {CONVERT_TO_KOHYA}.")
        dora.setdefault(component, set()).add("dora_scale" in params)
    mixed = next((c for c, kinds in dora.items() if len(kinds) > 1), None)
    if mixed:
        raise SdtuneError(f"diffusers' loader holds DoRA on all of a component's LoRA layers or none, but {mixed} "
                          f"mixes them; {CONVERT_TO_KOHYA}.")


def to_diffusers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical state -> (tensors, safetensors metadata) that diffusers' `load_lora_weights` reads with
    the right alpha: PEFT keys plus each component's LoraConfig under `lora_adapter_metadata`."""
    modules = group_modules(state)
    _check_peft_holds(modules)
    tensors: dict[str, torch.Tensor] = {}
    for (component, path), params in modules.items():
        name = f"{component}.{file_path(component, path)}"
        for param in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{name}.{param}"] = params[param]
        if "dora_scale" in params:  # peft's shapes: [out] for a linear layer, [1, out, 1, 1] for a convolution
            shape = (-1,) if params["lora_A.weight"].ndim == 2 else (1, -1, 1, 1)
            tensors[f"{name}.{MAGNITUDE_KEYS[component]}"] = params["dora_scale"].reshape(shape)
    packed: dict[str, Any] = {}
    for component in sorted({c for c, _ in modules}):
        packed.update({f"{component}.{k}": v for k, v in _lora_config(component, modules).items()})
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return tensors, metadata


def _match_pattern(patterns: Mapping[str, Any], name: str) -> Any | None:
    """peft's pattern rule: a key matches a module whose name ends with it at a `.` boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def _adapter_configs(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SdtuneError(
            f"LoRA metadata {LORA_ADAPTER_METADATA_KEY!r} is not valid JSON ({exc}); re-export the file."
        ) from exc
    configs: dict[str, dict[str, Any]] = {}
    for key, value in checked_adapter_header(packed).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _canonical_params(params: dict[str, torch.Tensor], cfg: Mapping[str, Any], path: str) -> None:
    """Alpha from the adapter config (rank where it has none), DoRA's magnitude as a [out, 1, ...] dora_scale."""
    magnitude = params.pop(MAGNITUDE, None)
    down = params["lora_A.weight"]
    r = int(down.shape[0]) if down.ndim else 0  # 0-dim: checked_state refuses
    alpha = _match_pattern(cfg.get("alpha_pattern") or {}, path)
    alpha = float(cfg.get("lora_alpha", r) if alpha is None else alpha)
    if cfg.get("use_rslora"):
        alpha = alpha * r**0.5  # rsLoRA scales by alpha/sqrt(r); keep the same effective scale
    params["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if magnitude is not None:
        params["dora_scale"] = magnitude.reshape(-1, *[1] * (down.ndim - 1))


def from_diffusers(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    module_paths: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys (+ `lora_adapter_metadata`) -> canonical state; alpha = rank where the file has none.
    With `module_paths`, paths are checked and spelled as the live model does (`text_model.` or not)."""
    configs = _adapter_configs(metadata)
    live = {c: set(p) for c, p in module_paths.items()} if module_paths is not None else {}
    modules: Modules = {}
    for key, tensor in sd.items():
        component, _, rest = key.partition(".")
        param = param_of(rest, PEFT_PARAMS)
        if component not in COMPONENTS or param is None:
            raise SdtuneError(f"LoRA key {key!r} is not a diffusers PEFT key (<component>.<module>.lora_A/B.weight).")
        if module_paths is not None and component not in live:
            raise not_in_model(key, sd, metadata)
        path = live_path(rest[: -len(param) - 1], live.get(component))
        if path is None:
            raise not_in_model(key, sd, metadata)
        param = MAGNITUDE if param.startswith(MAGNITUDE) else param  # either spelling of DoRA's magnitude
        modules.setdefault((component, path), {})[param] = tensor
    for (component, path), params in modules.items():
        if "lora_A.weight" not in params or "lora_B.weight" not in params:
            raise SdtuneError(f"LoRA module {component}.{path} lacks lora_A or lora_B; the file is incomplete.")
        _canonical_params(params, configs.get(component, {}), path)
    return ungroup_modules(modules)
