"""LoRA-family state dicts between sdtune's canonical keys and kohya/LyCORIS (A1111/ComfyUI) keys, with the
name tables and the sniffing both layouts share (the diffusers/PEFT layout is in lora_diffusers.py).

Canonical: `<component>.<module path>.<param>` with components `unet`, `text_encoder`, `text_encoder_2`, module
paths as the live model names them, and per module the parameters of one algorithm (formats/lycoris.py):
- LoRA/LoCon: `lora_A.weight` ([r, in] or [r, in, kh, kw]), `lora_B.weight` ([out, r] or [out, r, 1, 1]),
  optionally `lora_mid.weight` (a LoCon Tucker core, [r, r, kh, kw]);
- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (+ `hada_t1`, `hada_t2` for Tucker);
- LoKr: `lokr_w1` or `lokr_w1_a` + `lokr_w1_b`, `lokr_w2` or `lokr_w2_a` + `lokr_w2_b` (+ `lokr_t2`);
- any of them: `alpha` (0-dim) and DoRA's magnitude `dora_scale`, whose shape records its axis: [out, 1, ...]
  one magnitude per output feature (peft's, what sdtune trains), [1, in, ...] one per input feature.
sdtune's file layout is this state with text-encoder modules spelled as files spell them (`text_model.`), whatever
the installed transformers calls them. LoHa/LoKr names and shapes are LyCORIS's kohya suffixes, which peft's
LoHa/LoKr layers share. Tensors are passed through untouched, so conversions are bit-exact.
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
from .lora_clients import DIFFUSERS_CLIENTS, KOHYA_CLIENTS, SDTUNE_CLIENTS
from .ldm_names import diffusers_to_ldm_unet_names, ldm_to_diffusers_unet_names
from .lycoris import (CANONICAL_PARAMS, KOHYA_PARAMS, MAGNITUDE, UNSUPPORTED_SUFFIXES, algorithm, check_module,
                      input_width, param_of, rank, update_shape)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
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
           keys=rf"({'|'.join(p for prefixes in KOHYA_PREFIXES.values() for p in prefixes)}).*", clients=KOHYA_CLIENTS),
    Layout("diffusers", "LoRA (diffusers / PEFT)", keys=_PEFT_KEY + rf"(lora_[AB]\.weight|{MAGNITUDE}(\.weight)?)",
           clients=DIFFUSERS_CLIENTS),
    Layout("sdtune", "LoRA (sdtune)", keys=_PEFT_KEY + f"({'|'.join(map(re.escape, KOHYA_PARAMS))})",
           clients=SDTUNE_CLIENTS),
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


def file_path(component: str, path: str) -> str:
    """Module path as files spell it: text encoders always under `text_model.`."""
    if component != "unet" and path.startswith(_CLIP_FLAT_ROOTS):
        return CLIP_FILE_PREFIX + path
    return path


def live_path(path: str, live: set[str] | None) -> str | None:
    """A file's module path as the live model names it (adds or drops `text_model.` for text encoders): None
    when the model has no such module, the path itself when `live` is None (nothing to check against)."""
    if live is None or path in live:
        return path
    for candidate in (path.removeprefix(CLIP_FILE_PREFIX), CLIP_FILE_PREFIX + path):
        if candidate in live:
            return candidate
    return None


def group_modules(state: Mapping[str, torch.Tensor], name: str = "LoRA") -> Modules:
    """Canonical state -> {(component, module path): {param: tensor}}, each module checked as one whole update
    of one algorithm (complete, floating, shapes that fit together, a finite scalar alpha or none)."""
    modules: Modules = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        param = param_of(rest, KOHYA_PARAMS)
        if component not in COMPONENTS or param is None:
            raise SdtuneError(f"{name} key {key!r} is not in sdtune's layout <component>.<module>.<parameter> "
                              "(lora_A.weight, hada_w1_a, lokr_w1, alpha, ...).")
        modules.setdefault((component, rest[: -len(param) - 1]), {})[param] = value
    for (component, path), params in modules.items():
        check_module(f"{name} module {component}.{path}", params)
    return modules


def checked_state(state: Mapping[str, torch.Tensor], name: str = "LoRA") -> dict[str, torch.Tensor]:
    """The canonical state once every module is checked (see group_modules); refuses a bad one by module name."""
    group_modules(state, name)
    return dict(state)


def ungroup_modules(modules: Modules) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}.{param}": t for (c, p), params in modules.items() for param, t in params.items()}


def module_rank(params: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by; None for a LoKr module without a split factor (scale 1)."""
    return rank(params)


def module_alpha(params: Mapping[str, torch.Tensor]) -> float:
    """The module's alpha; absent means alpha = rank (scale 1), the kohya and PEFT convention."""
    alpha = params.get("alpha")
    return float(alpha.item()) if alpha is not None else float(module_rank(params) or 1)


def network_fields(modules: Modules) -> dict[str, str]:
    """kohya's `ss_network_module`/`ss_network_args` for what the modules hold: plain LoRA/LoCon is kohya's
    networks.lora, anything else LyCORIS's module with its `algo` (and `dora_wd` for DoRA)."""
    algos = {algorithm(p) for p in modules.values()}
    plain = algos == {"LoRA"} and not any("lora_mid.weight" in p or "dora_scale" in p for p in modules.values())
    if plain:
        return {"ss_network_module": "networks.lora"}
    args = {"algo": "lora" if algos == {"LoRA"} else "+".join(sorted(a.lower() for a in algos))}
    if any("dora_scale" in p for p in modules.values()):
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args, sort_keys=True)}


# ---------------------------------------------------------------------------------------------- sdtune


def to_sdtune(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical state -> sdtune's file layout: the same keys with text-encoder modules spelled as files spell
    them (`text_model.`), so a file does not depend on the transformers version that wrote it."""
    modules = group_modules(state)
    return {f"{c}.{file_path(c, p)}.{param}": t for (c, p), params in modules.items() for param, t in params.items()}


def from_sdtune(sd: Mapping[str, torch.Tensor], module_paths: Mapping[str, Iterable[str]],
                name: str = "LoRA") -> dict[str, torch.Tensor]:
    """sdtune-layout keys (text encoders with or without `text_model.`: earlier sdtune wrote the live names,
    which differ between transformers 4.x and 5) -> canonical state spelled as the live model names its modules; a
    module the model lacks keeps its name, for the applying code to refuse by name."""
    live = {c: set(p) for c, p in module_paths.items()}
    modules: Modules = {}
    for (component, path), params in group_modules(sd, name).items():
        modules[(component, live_path(path, live.get(component)) or path)] = params
    return ungroup_modules(modules)


def is_sdxl_unet(unet_config: Mapping[str, Any] | None) -> bool:
    """True for a UNet with SDXL's added text/time conditioning."""
    return bool(unet_config) and unet_config.get("addition_embed_type") == "text_time"


# ---------------------------------------------------------------------------------------------- kohya


def ecosystem_metadata(state: Mapping[str, torch.Tensor], family: str, prediction_type: str) -> dict[str, str]:
    """kohya `ss_*` and SAI `modelspec.*` header fields describing a LoRA (most common rank and alpha)."""
    modules = group_modules(state)
    ranks = Counter(r for r in map(module_rank, modules.values()) if r is not None).most_common(1)
    alpha = Counter(module_alpha(p) for p in modules.values()).most_common(1)[0][0]
    arch = MODELSPEC_ARCH.get((family, prediction_type), MODELSPEC_ARCH.get((family, "epsilon"), ""))
    return {
        **network_fields(modules),
        "ss_network_dim": str(ranks[0][0] if ranks else 1),
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
    modules = group_modules(state)
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
            name = prefix + file_path(component, path).replace(".", "_")
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
                table[prefix + file_path(component, path).replace(".", "_")] = (component, path)
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
        if kparam in UNSUPPORTED_SUFFIXES:
            raise SdtuneError(f"LoRA key {key!r} is LyCORIS {UNSUPPORTED_SUFFIXES[kparam]}, which sdtune does not "
                              "apply; it reads LoRA, LoCon, LoHa, LoKr and DoRA files.")
        if kparam not in CANONICAL_PARAMS:
            raise SdtuneError(f"LoRA key {key!r} is no weight of a LoRA, LoCon, LoHa, LoKr or DoRA file.")
        if name not in table:
            if unet_config is None and name.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")):
                raise SdtuneError(f"LoRA key {key!r} uses LDM-style UNet names; pass the UNet config to read it.")
            raise not_in_model(key, sd, metadata)
        modules.setdefault(table[name], {})[CANONICAL_PARAMS[kparam]] = tensor
    for params in modules.values():  # a damaged module is refused by checked_state, naming the file
        _dora_scale_with_axis(params)
        if "alpha" not in params and update_shape(params) is not None and module_rank(params):
            params["alpha"] = torch.tensor(float(module_rank(params)), dtype=torch.float32)
    return ungroup_modules(modules)


def _dora_scale_with_axis(params: dict[str, torch.Tensor]) -> None:
    """A 1-D dora_scale (peft's magnitude written as is) as [out, 1, ...], the shape that says its axis."""
    scale, down = params.get("dora_scale"), params.get("lora_A.weight")
    if scale is not None and scale.ndim == 1:
        params["dora_scale"] = scale.reshape(-1, *[1] * (max(2, down.ndim if down is not None else 2) - 1))


def not_in_model(key: str, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> SdtuneError:
    family = lora_family_hints(sd, metadata).get("family")
    guess = f" (the LoRA looks made for {family})" if family else ""
    return SdtuneError(f"LoRA key {key!r} names no module of this model{guess}; use a LoRA made for this model.")


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
    """Input width of a cross-attention key/value update: the text-context width of the target UNet."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        k = key.replace("_", ".")
        param = param_of(key, (*CANONICAL_PARAMS, *KOHYA_PARAMS))
        if param and ("attn2.to.k" in k or "attn2.to.v" in k):
            modules.setdefault(key[: -len(param) - 1], {})[CANONICAL_PARAMS.get(param, param)] = tensor
    return next((w for w in map(input_width, modules.values()) if w is not None), None)


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
