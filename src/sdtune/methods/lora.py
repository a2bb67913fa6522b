"""LoRA and its family: low-rank updates of chosen linear/conv layers, injected with peft.

`--algo` picks the update (lora_algorithms.py): LoRA (with --dora, DoRA), LoHa or LoKr, as LyCORIS and kohya
pick it (`--network_args algo=loha`): every LoRA setting means the same for each, and the files are one family
that A1111, ComfyUI and `generate` apply through `<lora:NAME:W>`.

Canonical state keys: `<component>.<module path>.<param>` with component in unet / text_encoder / text_encoder_2;
LoRA's `lora_A.weight` and `lora_B.weight` plus `.dora_scale` ([out, 1, ...]: peft's DoRA magnitude, one per output
feature) with --dora, LoHa's `hada_*` and LoKr's `lokr_*` (peft's names, which are LyCORIS's); `.alpha` (0-dim) on
every module. Files are converted by sdtune.formats.lora, and LoCon/LoHa/LoKr/DoRA files (formats/lycoris.py) are
applied by merging their update into the weights (weight_merge.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import SdtuneError
from ..formats import written_names
from ..formats.lora import LAYOUTS
from ..formats.lora_diffusers import MAGNITUDE as PEFT_MAGNITUDE  # peft's DoRA magnitude: [out], or [1, out, 1, 1]
from ..lora_algorithms import (ALGORITHMS, check_layout, check_settings, inject, layer_alpha, param_groups,
                               trained_layers)
from . import CompareRow, Method

TRAIN_ADAPTER = "sdtune"
# Named groups of UNet layers users ask for by name; anything else is taken as a module-name suffix.
UNET_TARGET_GROUPS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    "conv": ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"],
    "time": ["time_emb_proj"],  # each ResNet block's timestep-embedding projection
    "io": ["conv_in", "conv_out"],
    "resample": ["downsamplers.0.conv", "upsamplers.0.conv"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_KEY = re.compile(r"^(?P<component>[a-z_0-9]+?)\.(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha|"
                      r"dora_scale)$")


@dataclass
class LoRAConfig:
    """LoRA's own settings."""

    algo: str = opt("lora", "the update trained, as LyCORIS's and kohya's algo=: lora (low-rank product), loha "
                    "(Hadamard product of two low-rank products), lokr (Kronecker product); every LoRA setting "
                    "means the same for each, and A1111/ComfyUI load all three with <lora:NAME:W>",
                    choices=tuple(ALGORITHMS))
    rank: int = opt(4, "LoRA rank r (LyCORIS's dim; LoKr: the rank of its split factors)", min=1, max=4096)
    alpha: float = opt(0.0, "LoRA alpha; the update is scaled by alpha/rank (0: alpha = rank; LoKr layers whose "
                       "factors are both full are scale 1, as in LyCORIS)", min=0.0)
    dropout: float = opt(0.0, "dropout on the LoRA input during training (LoRA only)", min=0.0, max=0.99)
    rank_dropout: float = opt(0.0, "LoHa/LoKr: chance of dropping each output row of the update at a step "
                              "(LyCORIS rank_dropout)", min=0.0, max=0.99)
    module_dropout: float = opt(0.0, "LoHa/LoKr: chance of skipping a layer's whole update at a step (LyCORIS "
                                "module_dropout)", min=0.0, max=0.99)
    lokr_factor: int = opt(-1, "LoKr: split each width as factor x width/factor (LyCORIS factor; -1: as balanced "
                           "as possible)", min=-1, max=4096)
    lokr_decompose_both: bool = opt(False, "LoKr: also factor the small Kronecker factor w1 at the rank (LyCORIS "
                                    "decompose_both; by default w1 is full rank, as in LyCORIS)")
    targets: str = opt("attn", "comma list of layer groups (attn, ff, conv, time, io, resample) or "
                       "module-name suffixes", flag="lora-targets")
    train_text_encoder: bool = opt(False, "also put LoRA on the text encoder(s) attention projections")
    text_encoder_lr: float = opt(0.0, "learning rate of the text-encoder LoRA (0: the run's lr)", min=0.0,
                                 max=10.0)
    loraplus_ratio: float = opt(1.0, "LoRA+: the B (up) matrices learn this many times faster than A "
                                "(1: plain LoRA; the LoRA+ paper suggests 16)", min=1.0, max=1000.0)
    format: str = opt("kohya", "file layout written (diffusers: LoRA and DoRA only)", choices=written_names(LAYOUTS))
    dora: bool = opt(False, "DoRA (peft's use_dora): also learn one magnitude per output feature of each layer")


def unet_target_modules(targets: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in targets.split(",") if t.strip()):
        names += UNET_TARGET_GROUPS.get(item, [item])
    return list(dict.fromkeys(names))


class LoRA(Method):
    """The LoRA method (see module docstring)."""

    name = "lora"
    label = "LoRA"
    config_class = LoRAConfig
    default_lr = 1e-4
    layouts = LAYOUTS
    prompt_tag = "lora"
    prompt_tag_aliases = ("lyco",)  # as A1111's built-in Lora extension (LyCORIS files load through it)
    converts = True
    a1111_hash_field, a1111_hash = "Lora hashes", "tensors"
    # builtin: measured on the builtin model (BENCHMARKS.md). LoRA on the ResNet convolutions too: the subject
    # stays on its token (prior preservation 1.00 over 3 seeds against 0.69 for attention alone) at the same
    # subject fidelity. The LyCORIS algorithms and DoRA are rows of this method (as dreambooth-no-prior is of
    # DreamBooth); session 7: LoHa and LoKr at twice LoRA's rate (3 seeds: 0.29 and 0.22 against LoRA's 0.25),
    # LoKr at factor 4 and rank 16 ("full dimension" on these widths), DoRA with the LoRA row's settings (one
    # seed); the four-subject search (4 subjects x 3 seeds) then kept these against one alternative each, except
    # LoHa at rank 4 (0.50 against rank 8's 0.49, with half the parameters). real: LyCORIS's recommended starting
    # points for SD1.5 (its docs' algorithm list: LoHa dim <= 32 with alpha 1 to dim/2; a "large" LoKr with
    # factor ~8 and full dimension, alpha then ignored; its guidelines' preset attn-mlp); its docs name no
    # learning rate, so the LoRA row's.
    compare_rows = (
        CompareRow("lora", "#ff7f0e", {
            "builtin": {"train": {"steps": 400, "lr": 5.0e-3, "batch_size": 4},
                        "lora": {"rank": 8, "targets": "attn,conv"}},
            "real": {"train": {"steps": 800, "lr": 1.0e-4, "batch_size": 1}, "lora": {"rank": 4}}}),
        CompareRow("loha", "#ad494a", {
            "builtin": {"train": {"steps": 400, "lr": 1.0e-2, "batch_size": 4},
                        "lora": {"algo": "loha", "rank": 4, "targets": "attn,conv"}},
            "real": {"train": {"steps": 800, "lr": 1.0e-4, "batch_size": 1},
                     "lora": {"algo": "loha", "rank": 8, "alpha": 4.0, "targets": "attn,ff"}}}, in_default=False),
        CompareRow("lokr", "#e7ba52", {
            "builtin": {"train": {"steps": 400, "lr": 1.0e-2, "batch_size": 4},
                        "lora": {"algo": "lokr", "rank": 16, "lokr_factor": 4, "targets": "attn,conv"}},
            # rank 4096: "full dimension" (no factor split) on every SD1.5 layer at factor 8
            "real": {"train": {"steps": 800, "lr": 1.0e-4, "batch_size": 1},
                     "lora": {"algo": "lokr", "rank": 4096, "lokr_factor": 8, "targets": "attn,ff"}}}, in_default=False),
        CompareRow("lora-dora", "#ffbb78", {
            "builtin": {"train": {"steps": 400, "lr": 5.0e-3, "batch_size": 4},
                        "lora": {"rank": 8, "targets": "attn,conv", "dora": True}},
            "real": {"train": {"steps": 800, "lr": 1.0e-4, "batch_size": 1}, "lora": {"rank": 4, "dora": True}}}, in_default=False),
    )

    recipe_keys = ("algo", "dora")

    def __init__(self, cfg: LoRAConfig | None = None):
        self.cfg = cfg or LoRAConfig()
        check_settings(self.cfg)  # before anything loads or trains

    @property
    def alpha(self) -> float:
        return self.cfg.alpha or float(self.cfg.rank)

    # Training -----------------------------------------------------------------------------------------------
    def setup(self, model) -> list[dict]:
        for module in model.components().values():
            module.requires_grad_(False)
        plan = {"unet": unet_target_modules(self.cfg.targets)}
        if self.cfg.train_text_encoder:
            plan.update({name: TEXT_TARGETS for name in model.components() if name.startswith("text_encoder")})
        named: list[tuple[str, torch.nn.Parameter]] = []
        for component, targets in plan.items():
            try:
                found = inject(model.components()[component], targets, self.cfg, self.alpha, TRAIN_ADAPTER)
            except ValueError as exc:
                raise SdtuneError(f"No {component} layer matches --lora-targets '{self.cfg.targets}'.") from exc
            named += [(f"{component}.{n}", p) for n, p in found]
        return param_groups(named, self.cfg.algo, self.cfg.loraplus_ratio, self.cfg.text_encoder_lr)

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state: dict[str, torch.Tensor] = {}
        for component, module in model.components().items():
            layers = trained_layers(module, TRAIN_ADAPTER)
            if not layers:
                continue
            weights = get_peft_model_state_dict(module, adapter_name=TRAIN_ADAPTER)
            for key, value in weights.items():
                key, value = _canonical_magnitude(key, value)
                state[f"{component}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
            for path, layer in layers.items():
                alpha = layer_alpha(layer, TRAIN_ADAPTER, self.cfg.algo)
                state[f"{component}.{path}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return state

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        for component, weights in _split_by_component(state).items():
            module = model.components()[component]
            tensors = dict(_peft_magnitude(module, k, v) for k, v in weights.items() if not k.endswith(".alpha"))
            result = set_peft_model_state_dict(module, tensors, adapter_name=TRAIN_ADAPTER)
            if result.unexpected_keys:
                raise SdtuneError(f"Checkpoint does not fit this LoRA setup ({result.unexpected_keys[0]}).")

    def metadata(self) -> dict[str, str]:
        facts = {"algo": self.cfg.algo, "rank": str(self.cfg.rank), "alpha": str(self.alpha),
                 "targets": self.cfg.targets, "train_text_encoder": str(self.cfg.train_text_encoder).lower(),
                 "dora": str(self.cfg.dora).lower()}
        if self.cfg.algo == "lokr":
            facts.update(lokr_factor=str(self.cfg.lokr_factor),
                         lokr_decompose_both=str(self.cfg.lokr_decompose_both).lower())
        return facts

    # Inference ----------------------------------------------------------------------------------------------
    def apply(self, model, state: dict[str, torch.Tensor], weight: float = 1.0, name: str = "lora") -> None:
        """Inject `state` as its own adapter next to any already applied, scaled by `weight`; other algorithms
        than plain LoRA (LoCon's Tucker core, LoHa, LoKr, DoRA) are merged into the weights instead."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        if not _peft_holds(state):
            from ..weight_merge import merge_into_model

            merge_into_model(model, state, weight, name)
            return
        adapter = _adapter_name(name, model)
        components = model.components()
        grouped = _split_by_component(state)
        for component, weights in grouped.items():
            if component not in components:
                raise SdtuneError(f"LoRA '{name}' has weights for {component}, which this model does not have; "
                                  "it was made for another model family.")
            _check_fits(name, components[component], weights)
        for component, weights in grouped.items():
            module = components[component]
            ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")}
            alphas = {p: float(state.get(f"{component}.{p}.alpha", torch.tensor(float(r)))) for p, r in ranks.items()}
            rank = Counter(ranks.values()).most_common(1)[0][0]
            alpha = Counter(alphas.values()).most_common(1)[0][0]
            config = LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=sorted(ranks),
                rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
                alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha})
            inject_adapter_in_model(config, module, adapter_name=adapter)
            tensors = {k: v for k, v in weights.items() if not k.endswith(".alpha")}
            set_peft_model_state_dict(module, tensors, adapter_name=adapter)
            _activate(module, adapter, weight)

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        return f'--model {model} --artifacts {out_dir} --prompt "a {token} ... <lora:{name}:1>"'

    def output_files(self, name: str, fmt: str | None = None) -> list[str]:
        """What `save` writes into the output folder (every layout is one .safetensors file); a layout that cannot
        hold the algorithm is refused here, before training."""
        check_layout(self.cfg.algo, fmt or self.cfg.format)
        return [f"{name}.safetensors"]

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None = None) -> list[Path]:
        from ..artifacts import save_artifact

        path = Path(out_dir) / self.output_files(name, fmt)[0]
        tensors, extra = encode_state(self.state_dict(model), fmt or self.cfg.format, model)
        save_artifact(path, tensors, {**card, **extra})
        return [path]

    def decode_file(self, model, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path):
        """A LoRA file in any layout sdtune reads -> canonical state for this model (or a clear refusal)."""
        from ..formats.lora import (check_lora_family, checked_state, detect_lora_format, from_kohya, from_sdtune,
                                    lora_family_hints)
        from ..formats.lora_diffusers import from_diffusers

        named = isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in tensors.items())
        if not tensors or not named:
            raise SdtuneError(f"{path.name} holds no LoRA weights (named tensors); check that it is a LoRA file.")
        check_lora_family(lora_family_hints(tensors, metadata), model.family,
                          model.unet.config.cross_attention_dim, f"LoRA {path.name}")
        layout = detect_lora_format(tensors)
        paths = {c: [n for n, _ in m.named_modules()] for c, m in model.components().items() if c != "vae"}
        if layout == "kohya":
            state = from_kohya(tensors, paths, model.unet.config, metadata)
        elif layout == "diffusers":
            state = from_diffusers(tensors, metadata, paths)
        else:
            state = from_sdtune(tensors, paths, f"LoRA {path.name}")
        return checked_state(state, f"LoRA {path.name}")

    @classmethod
    def inspect_lines(cls, shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
        from ..lora_inspection import summary_lines

        return summary_lines(shapes)

    @classmethod
    def client_layers(cls, shapes: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list[str]:
        from ..lora_inspection import layer_descriptions

        return layer_descriptions(shapes, metadata)

    @staticmethod
    def recognises(obj, metadata: dict[str, str]) -> bool:
        from ..formats.lora import detect_lora_format

        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            return False
        try:
            detect_lora_format(obj)
        except SdtuneError:
            return False
        return True

    @classmethod
    def convert(cls, obj, metadata: dict[str, str], src: Path, dst: Path, to: str, model_spec: str | None) -> Path:
        """Re-encode a LoRA file in another layout; the run card and other header fields travel along."""
        from ..artifacts import save_artifact
        from ..formats.lora import lora_family_hints
        from ..formats.lora_header import LORA_ADAPTER_METADATA_KEY
        from ..model import architecture, base_model_from_card, load

        model_spec = model_spec or base_model_from_card(metadata)  # e.g. builtin: widths no family has
        model = load(model_spec) if model_spec else architecture(lora_family_hints(obj, metadata)["family"])
        state = cls().decode_file(model, obj, metadata, src)
        tensors, extra = encode_state(state, to, model)
        kept = {k: v for k, v in metadata.items() if k not in (LORA_ADAPTER_METADATA_KEY, "format")}
        return save_artifact(dst, tensors, {**kept, **extra})


def encode_state(state: dict[str, torch.Tensor], fmt: str, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical state -> (tensors, extra header metadata) in the requested file layout."""
    from ..formats.lora import ecosystem_metadata, to_kohya, to_sdtune
    from ..formats.lora_diffusers import to_diffusers

    extra = ecosystem_metadata(state, model.family, model.prediction_type)
    if fmt == "kohya":
        return to_kohya(state, model.unet.config), extra
    if fmt == "diffusers":
        tensors, metadata = to_diffusers(state)
        return tensors, {**extra, **metadata}
    return to_sdtune(state), extra


def _peft_holds(state: dict[str, torch.Tensor]) -> bool:
    """Plain LoRA (lora_A, lora_B, alpha): what peft's layers hold and diffusers' loader applies the same way."""
    return all(LORA_KEY.match(k) and not k.endswith(".dora_scale") for k in state)


def _canonical_magnitude(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """peft's DoRA magnitude as the canonical dora_scale [out, 1, ...] (same values); other keys unchanged."""
    if not key.endswith(PEFT_MAGNITUDE):
        return key, value
    return key.removesuffix(PEFT_MAGNITUDE) + "dora_scale", value.reshape(-1, *[1] * (max(value.ndim, 2) - 1))


def _peft_magnitude(module: torch.nn.Module, key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The canonical dora_scale back under peft's name and in the shape of peft's magnitude parameter."""
    if not key.endswith(".dora_scale"):
        return key, value
    path = key.removesuffix(".dora_scale")
    try:
        shape = module.get_submodule(f"{path}.{PEFT_MAGNITUDE}.{TRAIN_ADAPTER}").weight.shape
    except AttributeError:
        raise SdtuneError(f"Checkpoint does not fit this LoRA setup ({key}: train with --dora to resume it).") from None
    return f"{path}.{PEFT_MAGNITUDE}", value.reshape(shape)


def _split_by_component(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Canonical state (any algorithm's parameters) -> {component: {module path.param: tensor}}."""
    from ..formats.lora import COMPONENTS
    from ..formats.lycoris import KOHYA_PARAMS, param_of

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or param_of(rest, KOHYA_PARAMS) is None:
            raise SdtuneError(f"'{key}' is not a LoRA weight key.")
        grouped.setdefault(component, {})[rest] = value
    return grouped


def _check_fits(name: str, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA whose layers are missing or of another shape, naming the first misfit."""
    from peft.tuners.lora import LoraLayer

    layers = dict(module.named_modules())
    for key, value in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        layer = layers.get(path)
        base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
        found = (tuple(value.shape), tuple(weights.get(f"{path}.lora_B.weight", torch.empty(0)).shape))
        if base is None or _lora_shapes(base, found[0][0] if found[0] else 0) != found:
            raise SdtuneError(f"LoRA '{name}' does not fit this model (layer {path} "
                              f"{'is missing' if base is None else 'has another width'}); "
                              "it was made for another model family or size.")


def _lora_shapes(base: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (lora_A, lora_B) weight shapes peft gives `base` at `rank`; None for a layer LoRA cannot wrap."""
    if isinstance(base, torch.nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    if isinstance(base, torch.nn.Conv2d):
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
    return None


def _adapter_name(name: str, model) -> str:
    """A unique peft adapter name per applied artifact (peft names may not contain dots)."""
    used = model.extras.setdefault("lora_adapters", [])
    adapter = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{len(used)}"
    used.append(adapter)
    return adapter


def _activate(module: torch.nn.Module, adapter: str, weight: float) -> None:
    """Make `adapter` active beside the others already active in each LoRA layer, with its weight."""
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            active = [a for a in layer.active_adapters if a != adapter and a in layer.lora_A] + [adapter]
            layer.set_adapter(active)
            layer.set_scale(adapter, weight)
            layer.requires_grad_(False)
