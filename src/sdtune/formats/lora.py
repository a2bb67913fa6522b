"""LoRA state dicts between sdtune's canonical keys, kohya (A1111/ComfyUI) keys and diffusers/PEFT keys.

Canonical (what the LoRA method produces): `<component>.<module path>.lora_A.weight` ([r, in] or
[r, in, kh, kw]), `.lora_B.weight` ([out, r] or [out, r, 1, 1]) and `.alpha` (0-dim), with components
`unet`, `text_encoder`, `text_encoder_2` and module paths as the live model names them. Scale = alpha / r.
Tensors are passed through untouched, so conversions are bit-exact (a diffusers file keeps alpha in
its metadata, so from_diffusers rebuilds it as a float32 scalar of the same value).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import SdtuneError
from . import Layout, matching_layout
from .ldm_names import diffusers_to_ldm_unet_names, ldm_to_diffusers_unet_names
from .lora_header import LORA_ADAPTER_METADATA_KEY, checked_adapter_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Canonical parameter name <-> kohya parameter name (one table, both directions).
KOHYA_PARAMS: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "alpha": "alpha",
}
CANONICAL_PARAMS: dict[str, str] = {v: k for k, v in KOHYA_PARAMS.items()}
# Component -> kohya name prefixes it may be written with (first one is written for SD1/SD2).
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
SDXL_TE_PREFIX: dict[str, str] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_PEFT_KEY = rf"({'|'.join(COMPONENTS)})\.(.*\.)?"  # a component, then the module path (peft's key names)
# The file layouts, in sniffing order (a diffusers file has no `.alpha` keys, an sdtune file has them).
LAYOUTS: tuple[Layout, ...] = (
    Layout("kohya", "LoRA (kohya / A1111 / ComfyUI)",
           keys=rf"({'|'.join(p for prefixes in KOHYA_PREFIXES.values() for p in prefixes)}).*"),
    Layout("diffusers", "LoRA (diffusers / PEFT)", keys=_PEFT_KEY + r"lora_[AB]\.weight"),
    Layout("sdtune", "LoRA (sdtune)", keys=_PEFT_KEY + r"(lora_[AB]\.weight|alpha)"),
)
# transformers >= 5 flattens CLIPTextModel (no `text_model.`); files always carry the prefix.
CLIP_FILE_PREFIX = "text_model."
_CLIP_FLAT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm")
# Width of the cross-attention context / text encoder per family.
CONTEXT_FAMILY: dict[int, str] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_KOHYA_VERSION_FAMILY = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))
_MODELSPEC_FAMILY = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))

Modules = dict[tuple[str, str], dict[str, torch.Tensor]]

# What kohya's trainer and the SAI model spec write for each family, so A1111, ComfyUI and model sites
# show the base model (and sdtune's own family check works on files from elsewhere).
KOHYA_BASE_VERSION: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH: dict[tuple[str, str], str] = {
    ("sd1", "epsilon"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
}
MODELSPEC_PREDICTION: dict[str, str] = {"epsilon": "epsilon", "v_prediction": "v"}


def _file_path(component: str, path: str) -> str:
    """Module path as files spell it: text encoders always under `text_model.`."""
    if component != "unet" and path.startswith(_CLIP_FLAT_ROOTS):
        return CLIP_FILE_PREFIX + path
    return path


def _group(state: Mapping[str, torch.Tensor]) -> Modules:
    """Canonical state -> {(component, module path): {param: tensor}}, checked for completeness."""
    modules: Modules = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        param = next((p for p in KOHYA_PARAMS if rest.endswith("." + p)), None)
        if component not in COMPONENTS or param is None:
            raise SdtuneError(f"LoRA key {key!r} is not in sdtune's layout <component>.<module>.lora_A/lora_B/alpha.")
        modules.setdefault((component, rest[: -len(param) - 1]), {})[param] = value
    for (component, path), params in modules.items():
        if "lora_A.weight" not in params or "lora_B.weight" not in params:
            raise SdtuneError(f"LoRA module {component}.{path} lacks lora_A or lora_B; the LoRA file is incomplete.")
    return modules


def checked_state(state: Mapping[str, torch.Tensor], name: str = "LoRA") -> dict[str, torch.Tensor]:
    """Canonical state in which every module has a floating lora_A [r, in] or [r, in, kh, kw], a lora_B whose
    second dimension is r, and a finite scalar alpha (or none); anything else is refused by module name."""
    for (component, path), params in _group(state).items():
        a, b, alpha = params["lora_A.weight"], params["lora_B.weight"], params.get("alpha")
        if not (a.ndim in (2, 4) and b.ndim == a.ndim and a.shape[0] >= 1 and b.shape[1] == a.shape[0]
                and a.is_floating_point() and b.is_floating_point()
                and (alpha is None or (alpha.numel() == 1 and bool(alpha.float().isfinite().all())))):
            raise SdtuneError(f"{name} module {component}.{path} has malformed weights (lora_A {list(a.shape)}, lora_B "
                              f"{list(b.shape)}); the file is damaged, re-export it.")
    return dict(state)


def _ungroup(modules: Modules) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}.{param}": t for (c, p), params in modules.items() for param, t in params.items()}


def _rank(params: Mapping[str, torch.Tensor]) -> int:
    return int(params["lora_A.weight"].shape[0]) if params["lora_A.weight"].ndim else 0  # 0-dim: checked_state refuses


def _alpha(params: Mapping[str, torch.Tensor]) -> float:
    """The module's alpha; absent means alpha = rank (scale 1), the kohya and PEFT convention."""
    alpha = params.get("alpha")
    return float(alpha.item()) if alpha is not None else float(_rank(params))


def is_sdxl_unet(unet_config: Mapping[str, Any] | None) -> bool:
    """True for a UNet with SDXL's added text/time conditioning."""
    return bool(unet_config) and unet_config.get("addition_embed_type") == "text_time"


# ---------------------------------------------------------------------------------------------- kohya


def ecosystem_metadata(state: Mapping[str, torch.Tensor], family: str, prediction_type: str) -> dict[str, str]:
    """kohya `ss_*` and SAI `modelspec.*` header fields describing a LoRA (most common rank and alpha)."""
    modules = _group(state)
    rank = Counter(_rank(p) for p in modules.values()).most_common(1)[0][0]
    alpha = Counter(_alpha(p) for p in modules.values()).most_common(1)[0][0]
    arch = MODELSPEC_ARCH.get((family, prediction_type), MODELSPEC_ARCH.get((family, "epsilon"), ""))
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": KOHYA_BASE_VERSION.get(family, ""),
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora" if arch else "",
        "modelspec.prediction_type": MODELSPEC_PREDICTION.get(prediction_type, prediction_type),
    }


def to_kohya(
    state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any] | None = None,
    *,
    ldm_unet_names: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Canonical state -> kohya keys. SDXL (by config or a text_encoder_2) gets `lora_te1_/lora_te2_` and,
    like kohya's SDXL trainer, LDM-style UNet names; SD1/SD2 get diffusers-style names as kohya writes them."""
    modules = _group(state)
    sdxl = is_sdxl_unet(unet_config) or any(c == "text_encoder_2" for c, _ in modules)
    ldm = sdxl if ldm_unet_names is None else ldm_unet_names
    if ldm and unet_config is None:
        raise SdtuneError("Writing LDM-style kohya UNet names needs the UNet config; pass unet_config.")
    to_ldm = diffusers_to_ldm_unet_names(unet_config) if ldm else {}
    out: dict[str, torch.Tensor] = {}
    for (component, path), params in modules.items():
        if component == "unet":
            name = "lora_unet_" + to_ldm.get(path, path).replace(".", "_")
            if ldm and path not in to_ldm:
                raise SdtuneError(f"LoRA module unet.{path} has no LDM name for this UNet config; check the family.")
        else:
            prefix = SDXL_TE_PREFIX[component] if sdxl else KOHYA_PREFIXES[component][0]
            name = prefix + _file_path(component, path).replace(".", "_")
        for param, tensor in params.items():
            out[f"{name}.{KOHYA_PARAMS[param]}"] = tensor
    return out


def kohya_name_table(
    module_paths: Mapping[str, Iterable[str]], unet_config: Mapping[str, Any] | None = None
) -> dict[str, tuple[str, str]]:
    """{kohya module name: (component, live module path)} for the given model, both UNet spellings."""
    table: dict[str, tuple[str, str]] = {}
    for component, paths in module_paths.items():
        if component not in COMPONENTS:
            raise SdtuneError(f"Unknown model component {component!r}; use one of {list(COMPONENTS)}.")
        for path in paths:
            for prefix in KOHYA_PREFIXES[component]:
                table[prefix + _file_path(component, path).replace(".", "_")] = (component, path)
    if unet_config is not None and "unet" in module_paths:
        live = set(module_paths["unet"])
        for ldm, dif in ldm_to_diffusers_unet_names(unet_config).items():
            if dif in live:
                table["lora_unet_" + ldm.replace(".", "_")] = ("unet", dif)
    return table


def from_kohya(
    sd: Mapping[str, torch.Tensor],
    module_paths: Mapping[str, Iterable[str]],
    unet_config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya keys -> canonical state, mapping names through the model's real module paths
    (`_` is ambiguous); pass `unet_config` to accept LDM-style UNet names (SDXL, old SD1 files)."""
    table = kohya_name_table(module_paths, unet_config)
    modules: Modules = {}
    for key, tensor in sd.items():
        name, _, kparam = key.partition(".")
        if kparam not in CANONICAL_PARAMS:
            raise SdtuneError(
                f"LoRA key {key!r} is not a plain LoRA weight (lora_down/lora_up/alpha); "
                "LyCORIS/DoRA files are not supported."
            )
        if name not in table:
            if unet_config is None and name.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")):
                raise SdtuneError(f"LoRA key {key!r} uses LDM-style UNet names; pass the UNet config to read it.")
            raise _not_in_model(key, sd, metadata)
        modules.setdefault(table[name], {})[CANONICAL_PARAMS[kparam]] = tensor
    for (component, path), params in modules.items():
        if "lora_A.weight" not in params or "lora_B.weight" not in params:
            raise SdtuneError(f"LoRA module {component}.{path} lacks lora_down or lora_up; the file is incomplete.")
        params.setdefault("alpha", torch.tensor(float(_rank(params)), dtype=torch.float32))
    return _ungroup(modules)


# ------------------------------------------------------------------------------------------ diffusers


def _pattern(component: str, path: str) -> str:
    """A peft rank/alpha pattern key matching exactly this module (text encoders with or without `text_model.`)."""
    return re.escape(path.removeprefix(CLIP_FILE_PREFIX) if component != "unet" else path)


def _target(component: str, path: str) -> str:
    """A peft target_modules entry; peft matches it as the full name or a `.`-separated suffix."""
    return path.removeprefix(CLIP_FILE_PREFIX) if component != "unet" else path


def _lora_config(component: str, modules: Modules) -> dict[str, Any]:
    """peft LoraConfig fields for one component: commonest rank/alpha plus per-module patterns."""
    own = {path: params for (c, path), params in modules.items() if c == component}
    ranks = {path: _rank(p) for path, p in own.items()}
    alphas = {path: _alpha(p) for path, p in own.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(_target(component, p) for p in own),
        "rank_pattern": {_pattern(component, p): v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {_pattern(component, p): v for p, v in sorted(alphas.items()) if v != alpha},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }


def to_diffusers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical state -> (tensors, safetensors metadata) that diffusers' `load_lora_weights` reads with
    the right alpha: PEFT keys plus each component's LoraConfig under `lora_adapter_metadata`."""
    modules = _group(state)
    tensors: dict[str, torch.Tensor] = {}
    for (component, path), params in modules.items():
        for param in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{component}.{_file_path(component, path)}.{param}"] = params[param]
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


def _live_path(path: str, live: set[str] | None) -> str | None:
    """The module path as the live model names it (adds/drops `text_model.` for text encoders), or None."""
    if live is None or path in live:
        return path
    for candidate in (path.removeprefix(CLIP_FILE_PREFIX), CLIP_FILE_PREFIX + path):
        if candidate in live:
            return candidate
    return None


def _not_in_model(key: str, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> SdtuneError:
    family = lora_family_hints(sd, metadata).get("family")
    guess = f" (the LoRA looks made for {family})" if family else ""
    return SdtuneError(f"LoRA key {key!r} names no module of this model{guess}; use a LoRA made for this model.")


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
        param = next((p for p in ("lora_A.weight", "lora_B.weight") if rest.endswith("." + p)), None)
        if component not in COMPONENTS or param is None:
            raise SdtuneError(f"LoRA key {key!r} is not a diffusers PEFT key (<component>.<module>.lora_A/B.weight).")
        if module_paths is not None and component not in live:
            raise _not_in_model(key, sd, metadata)
        path = _live_path(rest[: -len(param) - 1], live.get(component))
        if path is None:
            raise _not_in_model(key, sd, metadata)
        modules.setdefault((component, path), {})[param] = tensor
    for (component, path), params in modules.items():
        if "lora_A.weight" not in params or "lora_B.weight" not in params:
            raise SdtuneError(f"LoRA module {component}.{path} lacks lora_A or lora_B; the file is incomplete.")
        cfg = configs.get(component, {})
        if cfg.get("use_dora"):
            raise SdtuneError("This LoRA file is a DoRA adapter; sdtune reads plain LoRA only.")
        r = _rank(params)
        alpha = _match_pattern(cfg.get("alpha_pattern") or {}, path)
        alpha = float(cfg.get("lora_alpha", r) if alpha is None else alpha)
        if cfg.get("use_rslora"):
            alpha = alpha * r**0.5  # rsLoRA scales by alpha/sqrt(r); keep the same effective scale
        params["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return _ungroup(modules)


# ------------------------------------------------------------------------------------- sniffing


def detect_lora_format(keys: Iterable[str]) -> str:
    """'kohya', 'diffusers' (PEFT keys, alpha in metadata) or 'sdtune' (PEFT keys + `.alpha`), by key sniffing."""
    keys = list(keys)
    layout = matching_layout(keys, LAYOUTS)
    if layout is not None:
        return layout.name
    sample = next((k for k in keys if not any(layout.holds([k]) for layout in LAYOUTS)), "(no keys)")
    raise SdtuneError(f"Not a LoRA layout sdtune reads (key {sample!r}); use a kohya or diffusers/PEFT LoRA file.")


def _context_width(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Input width of a cross-attention key/value LoRA: the text-context width of the target UNet."""
    for key, tensor in sd.items():
        k = key.replace("_", ".")
        if "attn2.to.k" in k or "attn2.to.v" in k:
            if k.endswith(("lora.down.weight", "lora.A.weight")) and tensor.ndim == 2:
                return int(tensor.shape[1])
    return None


def lora_family_hints(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Best guess of the base family a LoRA was made for: {'family': 'sd1'|'sd2'|'sdxl'|None,
    'context_dim': int|None, 'evidence': str}, from keys, kohya/modelspec metadata, then shapes."""
    meta = metadata or {}
    context = _context_width(sd)
    hints: dict[str, Any] = {"family": None, "context_dim": context, "evidence": "none"}
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in sd):
        return {**hints, "family": "sdxl", "evidence": "second text encoder keys"}
    version = str(meta.get("ss_base_model_version", ""))
    for marker, family in _KOHYA_VERSION_FAMILY:
        if version.startswith(marker):
            return {**hints, "family": family, "evidence": f"ss_base_model_version={version}"}
    arch = str(meta.get("modelspec.architecture", ""))
    for marker, family in _MODELSPEC_FAMILY:
        if arch.startswith(marker):
            return {**hints, "family": family, "evidence": f"modelspec.architecture={arch}"}
    if str(meta.get("ss_v2", "")).lower() == "true":
        return {**hints, "family": "sd2", "evidence": "ss_v2=True"}
    if context in CONTEXT_FAMILY:
        return {**hints, "family": CONTEXT_FAMILY[context], "evidence": f"cross-attention context width {context}"}
    return hints


def check_lora_family(hints: Mapping[str, Any], family: str, context_dim: int, name: str = "LoRA") -> None:
    """Refuse a LoRA whose hints contradict the loaded model (family or context width)."""
    found, width = hints.get("family"), hints.get("context_dim")
    if width is not None and width != context_dim:
        raise SdtuneError(
            f"{name} was made for a model with text context width {width} ({found or 'unknown family'}), "
            f"but this {family} model has {context_dim}; use a LoRA made for {family}."
        )
    if found is not None and found != family and width is None:
        raise SdtuneError(f"{name} was made for {found} ({hints.get('evidence')}); use a LoRA made for {family}.")
