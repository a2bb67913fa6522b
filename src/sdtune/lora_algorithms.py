"""The LoRA family as `sdtune train lora --algo` trains it through peft: LoRA (with --dora, DoRA), LoHa and LoKr.

One code path injects the adapter, collects what trains, groups it for the optimizer and reads each layer's alpha;
what differs between the algorithms is one row of ALGORITHMS: peft's config class and how the LoRA settings fill
it, the prefix of its parameter names (peft's names are the canonical ones, formats/lycoris.py), and which
matrices LoRA+ gives the larger step.

LoRA+ (Hayou et al. 2024) speeds up the output-side factor of a low-rank pair (LoRA's B), whose input is the
r-wide bottleneck rather than the layer's input. LoHa's update is the Hadamard product of two such pairs, so both
output-side factors (hada_w1_a, hada_w2_a) are sped up; in LoKr only split factors are pairs (lokr_w1_a,
lokr_w2_a), and full-rank Kronecker factors keep the run's rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SdtuneError


def _lora_options(cfg, alpha: float) -> dict[str, Any]:
    return {"r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_dora": cfg.dora}


def _lycoris_options(cfg, alpha: float) -> dict[str, Any]:
    """LoHa and LoKr as LyCORIS trains them: dropout of update rows and of whole layers, not of the input."""
    return {"r": cfg.rank, "alpha": alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout}


def _lokr_options(cfg, alpha: float) -> dict[str, Any]:
    # LyCORIS's initialisation (w1 random, w2 zero; peft's own is the reverse), so it trains as LyCORIS's would.
    return {**_lycoris_options(cfg, alpha), "decompose_factor": cfg.lokr_factor,
            "decompose_both": cfg.lokr_decompose_both, "init_weights": "lycoris"}


def _lokr_unsplit_scale_one(layer, adapter: str) -> None:
    """A LoKr layer whose factors are both full applies at scale 1 in A1111, ComfyUI and LyCORIS (which trains it
    so, recording alpha = dim); peft would scale it by alpha/r, so it trains at 1 here too and records alpha = r."""
    if adapter in layer.lokr_w1 and adapter in layer.lokr_w2:
        layer.alpha[adapter] = float(layer.r[adapter])
        layer.scaling[adapter] = 1.0


@dataclass(frozen=True)
class Algorithm:
    """How one member of the LoRA family trains through peft."""

    label: str
    peft_config: str  # the peft config class
    options: Callable[[Any, float], dict[str, Any]]  # (LoRAConfig, alpha) -> its fields besides target_modules
    prefix: str  # every trained parameter's name starts so (DoRA's lora_magnitude_vector too)
    faster: tuple[str, ...]  # the matrices LoRA+ speeds up (module docstring)
    alpha_attribute: str  # the peft layer's {adapter: alpha}
    settle: Callable[[Any, str], None] | None = None  # per injected layer, once its parameters exist


ALGORITHMS: dict[str, Algorithm] = {
    "lora": Algorithm("LoRA", "LoraConfig", _lora_options, "lora_", ("lora_B",), "lora_alpha"),
    "loha": Algorithm("LoHa", "LoHaConfig", _lycoris_options, "hada_", ("hada_w1_a", "hada_w2_a"), "alpha"),
    "lokr": Algorithm("LoKr", "LoKrConfig", _lokr_options, "lokr_", ("lokr_w1_a", "lokr_w2_a"), "alpha",
                      _lokr_unsplit_scale_one),
}
# What diffusers' load_lora_weights holds (its loader builds peft LoRA layers only).
DIFFUSERS_ALGORITHMS = ("lora",)


# Settings that only some algorithms have: field -> (those algorithms, why the others do not).
OWN_SETTINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "dora": (("lora",), "peft has no DoRA for LoHa or LoKr"),
    "dropout": (("lora",), "LyCORIS's LoHa and LoKr have no input dropout; use --rank-dropout or --module-dropout"),
    "rank_dropout": (("loha", "lokr"), "peft's LoRA has no such dropout; use --dropout"),
    "module_dropout": (("loha", "lokr"), "peft's LoRA has no such dropout; use --dropout"),
    "lokr_factor": (("lokr",), "only LoKr splits a width into Kronecker factors"),
    "lokr_decompose_both": (("lokr",), "only LoKr has Kronecker factors"),
}


def check_settings(cfg) -> None:
    """Refuse, in one line, LoRA settings that do not go together (before anything loads or trains)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, (owners, why) in OWN_SETTINGS.items():
        if cfg.algo not in owners and getattr(cfg, name) != defaults[name]:
            flag = "--" + name.replace("_", "-")
            raise SdtuneError(f"{flag} is for --algo {' or '.join(owners)}, not {cfg.algo}: {why}.")
    if cfg.lokr_factor == 0:
        raise SdtuneError("--lokr-factor is 0; give a factor of at least 1, or -1 for the most balanced split.")
    check_layout(cfg.algo, cfg.format)


def check_layout(algo: str, layout: str) -> None:
    """Refuse a file layout that cannot hold the algorithm's files."""
    if layout == "diffusers" and algo not in DIFFUSERS_ALGORITHMS:
        raise SdtuneError(f"{ALGORITHMS[algo].label} cannot be written in the diffusers layout: diffusers' LoRA "
                          "loader holds LoRA and DoRA only; use --format kohya (A1111, ComfyUI) or sdtune.")


def inject(module: torch.nn.Module, targets: list[str], cfg, alpha: float,
           adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Put `cfg.algo`'s adapter on `module`'s `targets` (ValueError: none matches); return its parameters by name,
    trainable."""
    import peft

    algo = ALGORITHMS[cfg.algo]
    config = getattr(peft, algo.peft_config)(target_modules=targets, **algo.options(cfg, alpha))
    peft.inject_adapter_in_model(config, module, adapter_name=adapter)
    if algo.settle is not None:
        for layer in trained_layers(module, adapter).values():
            algo.settle(layer, adapter)
    named = [(n, p) for n, p in module.named_parameters() if _is_own(n, adapter, algo.prefix)]
    for _, param in named:
        param.requires_grad_(True)
    return named


def _is_own(name: str, adapter: str, prefix: str) -> bool:
    """Whether a parameter name is one of the adapter's (`...<param>.<adapter>[.weight]`, param with `prefix`)."""
    parts = name.split(".")
    return adapter in parts and parts[parts.index(adapter) - 1].startswith(prefix)


def trained_layers(module: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """The peft layers holding `adapter`, by module path (every peft tuner layer keeps its ranks in `r`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "r", {})}


def layer_alpha(layer: torch.nn.Module, adapter: str, algo: str) -> float:
    """The alpha the layer trains with (LoKr's unsplit layers: their rank, see _lokr_unsplit_scale_one)."""
    return float(getattr(layer, ALGORITHMS[algo].alpha_attribute)[adapter])


def param_groups(named: list[tuple[str, torch.nn.Parameter]], algo: str, loraplus_ratio: float,
                 text_encoder_lr: float) -> list[dict]:
    """Optimizer groups by component (the text encoders may have their own lr) and by matrix (LoRA+: see the
    module docstring)."""
    faster = ALGORITHMS[algo].faster
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in named:
        is_text = name.startswith("text_encoder")
        is_faster = loraplus_ratio != 1.0 and any(f".{matrix}." in f"{name}." for matrix in faster)
        if (is_text, is_faster) not in groups:
            group: dict = {"params": []}
            if is_text and text_encoder_lr:
                group["lr"] = text_encoder_lr
            if is_faster:
                group["lr_factor"] = loraplus_ratio
            groups[is_text, is_faster] = group
        groups[is_text, is_faster]["params"].append(param)
    return list(groups.values())
