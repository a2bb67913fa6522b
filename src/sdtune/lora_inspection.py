"""What `sdtune inspect` says about a LoRA-family file from its tensor names and shapes alone (no data is read):
the algorithm of its layers (LoRA, LoCon, LoHa, LoKr, each maybe with DoRA), their ranks and the layer groups
they touch, in the group names `--lora-targets` uses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .errors import SdtuneError
from .formats.lora import KOHYA_PREFIXES, detect_lora_format, group_modules, module_alpha, module_rank
from .formats.lora_diffusers import MAGNITUDE, PEFT_PARAMS, from_diffusers
from .formats.lycoris import CANONICAL_PARAMS, KOHYA_PARAMS, algorithm, dora_axis, param_of, rank
from .methods.lora import UNET_TARGET_GROUPS

TEXT_GROUPS = {"attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")}
# Module-name endings of the UNet groups in the spellings --lora-targets does not use: LDM names (kohya's SDXL
# files, old SD1 files) and the time-embedding layers LyCORIS's presets add.
UNET_ALIASES = {
    "conv": ("in_layers_2", "out_layers_3", "skip_connection"),
    "time": ("emb_layers_1", "time_embedding_linear_1", "time_embedding_linear_2", "time_embed_0", "time_embed_2"),
    "io": ("input_blocks_0_0", "out_2"),
    "resample": ("op", "conv"),
}
_KOHYA_COMPONENTS = {prefix: component for component, prefixes in KOHYA_PREFIXES.items() for prefix in prefixes}


def _unet_groups() -> dict[str, tuple[str, ...]]:
    groups = {g: tuple(s.replace(".", "_") for s in suffixes) for g, suffixes in UNET_TARGET_GROUPS.items()}
    return {g: groups.get(g, ()) + UNET_ALIASES.get(g, ()) for g in {**groups, **UNET_ALIASES}}


def _group(component: str, module: str, unet_groups: Mapping[str, tuple[str, ...]]) -> str:
    name = module.replace(".", "_")
    table = unet_groups if component == "unet" else TEXT_GROUPS
    return next((g for g, ends in table.items() if any(name == e or name.endswith("_" + e) for e in ends)), "other")


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module name, canonical parameter) of a kohya or PEFT-layout key, or None."""
    prefix = next((p for p in _KOHYA_COMPONENTS if key.startswith(p)), None)
    if prefix is not None:
        name, _, kparam = key.partition(".")
        param = CANONICAL_PARAMS.get(kparam)
        return (_KOHYA_COMPONENTS[prefix], name[len(prefix):], param) if param else None
    component, _, rest = key.partition(".")
    param = param_of(rest, (*KOHYA_PARAMS, *PEFT_PARAMS))
    if param is None:
        return None
    return component, rest[: -len(param) - 1], MAGNITUDE if param.startswith(MAGNITUDE) else param


def _kind(params: Mapping[str, torch.Tensor]) -> str:
    algo = algorithm(params)
    if any(k in params for k in ("lora_mid.weight", "hada_t1", "lokr_t2")):
        return f"{'LoCon' if algo == 'LoRA' else algo} (Tucker)"
    down = params.get("lora_A.weight")
    return "LoCon" if down is not None and down.ndim == 4 and down.shape[2:] != (1, 1) else algo


def _counted(counter: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counter.most_common())


def _modules(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(component, module name): {canonical parameter: meta tensor}} of a LoRA-family file ({} if unreadable)."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, shape in shapes:
        parts = _split(key)
        if parts is None:
            return {}
        param = parts[2]
        if param == MAGNITUDE or (param == "dora_scale" and len(shape) == 1):  # peft's: one per output feature
            param, shape = "dora_scale", (max(1, torch.Size(shape).numel()), 1)
        modules.setdefault(parts[:2], {})[param] = torch.empty(shape, device="meta")
    return modules


def layer_descriptions(shapes: list[tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]) -> list[str]:
    """One line per layer, "<component> <group> <module> <algorithm>[ dora-out|dora-in][ scaled]", which the
    client rules (formats/lora_clients.py) read ([] if unreadable); scaled: the header gives an alpha other than
    the rank (a diffusers-layout file, whose alpha no client but diffusers reads)."""
    modules = _modules(shapes)
    try:
        kinds = {name: _kind(params).replace(" (Tucker)", "-Tucker") for name, params in modules.items()}
        axes = {name: dora_axis(p["dora_scale"]) for name, p in modules.items() if "dora_scale" in p}
        scaled = _scaled_in_header(shapes, metadata)
    except (ValueError, IndexError, KeyError, SdtuneError):
        return []
    unet_groups = _unet_groups()
    return [f"{c} {_group(c, m, unet_groups)} {m.replace('.', '_')} {kinds[(c, m)]}"
            f"{(' dora-out', ' dora-in')[axes[(c, m)]] if (c, m) in axes else ''}"
            f"{' scaled' if (c, m) in scaled else ''}" for c, m in modules]


def _scaled_in_header(shapes: list[tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]) -> set[tuple[str, str]]:
    """The layers of a diffusers-layout file whose header alpha is not their rank."""
    keys = [key for key, _ in shapes]
    if not keys or detect_lora_format(keys) != "diffusers":
        return set()
    state = from_diffusers({key: torch.empty(shape, device="meta") for key, shape in shapes}, metadata)
    modules = group_modules(state)
    return {name for name, params in modules.items() if module_alpha(params) != module_rank(params)}


def summary_lines(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> list[str]:
    """`algorithm:`, `rank:` and `layers:` lines for (key, shape) pairs of a LoRA-family file ([] if unreadable)."""
    modules = _modules(shapes)
    if not modules:
        return []
    try:
        kinds = Counter(_kind(p) for p in modules.values())
        ranks = Counter(str(rank(p) or "full") for p in modules.values())
        axes = Counter(dora_axis(p["dora_scale"]) for p in modules.values() if "dora_scale" in p)
    except (ValueError, IndexError, KeyError):
        return []  # not one algorithm per module: `inspect` still shows the tensors
    dora = [f"DoRA x{n} (one magnitude per {('output', 'input')[axis]} feature)" for axis, n in sorted(axes.items())]
    unet_groups = _unet_groups()
    groups: dict[str, Counter] = {}
    for component, module in modules:
        groups.setdefault(component, Counter())[_group(component, module, unet_groups)] += 1
    return [f"algorithm:  {'; '.join([_counted(kinds), *dora])}",
            f"rank:       {_counted(ranks)}",
            f"layers:     {'; '.join(f'{c} {_counted(g)}' for c, g in sorted(groups.items()))}"]
