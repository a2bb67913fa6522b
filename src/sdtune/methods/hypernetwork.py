"""Hypernetworks in the NovelAI / AUTOMATIC1111 sense: per context width, a pair of small residual MLPs that
transform the context fed to every attention layer's key and value projections.

Canonical state keys: `<width>.<k|v>.linear.<i>.<weight|bias>`. Files: sdtune's safetensors form (default) and
A1111's `.pt` layout (`--format a1111`, or `sdtune convert --to a1111`), both via sdtune.formats.hypernetwork;
the modules and the attention processor live in sdtune.hypernet_modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import opt
from ..errors import SdtuneError
from ..formats import hypernetwork as fmt_hn
from ..formats import written_names
from ..formats.hypernetwork import LAYOUTS, WEIGHT_INITS, HypernetworkFile, Structure
from . import CompareRow, Method

TRAIN_NAME = "__train__"
FILE_SUFFIX = {layout.name: layout.suffix for layout in LAYOUTS}  # format -> the file it is written as


@dataclass
class HypernetworkConfig:
    """Hypernetwork settings (A1111's defaults: 1,2,1, no activation, Normal init, no norm, no dropout)."""

    layer_structure: str = opt("1,2,1", "width multipliers of each module's layers; must start and end with 1")
    activation: str = opt("linear", "activation after each hidden Linear: linear (none), relu, leakyrelu, elu, "
                                    "swish, tanh, sigmoid or any torch.nn activation name in lower case")
    layer_norm: bool = opt(False, "LayerNorm after every Linear")
    dropout: str = opt("", "dropout: one probability (after every Linear but the last) or one value per "
                           "layer-structure entry, e.g. 0,0.3,0 (empty: none)")
    activate_output: bool = opt(False, "also apply the activation after the last Linear")
    weight_init: str = opt("Normal", "initialisation of fresh Linear weights", choices=WEIGHT_INITS)
    sizes: str = opt("auto", "context widths that get a module pair, e.g. 768,320,640,1280; auto: every width "
                             "the model's attention layers use")
    format: str = opt("sdtune", "file written: sdtune (.safetensors) or a1111 (.pt)",
                      choices=written_names(LAYOUTS))


def parse_numbers(text: str, what: str) -> list[float]:
    """'1, 2, 1' -> [1, 2, 1] (ints where whole, as A1111 files hold them)."""
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SdtuneError(f"{what} '{text}' must be a comma-separated list of numbers.") from None
    return [int(v) if v.is_integer() else v for v in values]


def structure_of(cfg: HypernetworkConfig) -> Structure:
    """The layer structure a config asks for, checked."""
    layers = tuple(parse_numbers(cfg.layer_structure, "--layer-structure"))
    dropout = parse_numbers(cfg.dropout, "--dropout") if cfg.dropout.strip() else [0]
    if len(dropout) == 1:  # one probability: after every Linear but the last, as A1111's default pattern
        dropout = [0] + [dropout[0]] * (len(layers) - 2) + [0] if len(layers) > 1 else [0]
    activation = cfg.activation.strip().lower()
    structure = Structure(layers, activation, cfg.layer_norm, cfg.weight_init, cfg.activate_output, tuple(dropout))
    structure.check()
    from ..hypernet_modules import make_activation

    if activation != "linear":
        make_activation(activation)
    return structure


def widths_for(model, sizes: str) -> list[int]:
    """The widths to train: every attention context width of the model, or those asked for."""
    from ..hypernet_modules import attention_widths

    available = attention_widths(model.unet)
    if sizes.strip().lower() in ("", "auto"):
        return available
    wanted = [int(w) for w in parse_numbers(sizes, "--sizes")]
    unused = [w for w in wanted if w not in available]
    if unused:
        raise SdtuneError(f"--sizes {unused[0]} matches no attention layer of this model; it uses "
                          f"{', '.join(map(str, available))} (or pass --sizes auto).")
    return list(dict.fromkeys(wanted))


class Hypernetwork(Method):
    """The hypernetwork method (see module docstring)."""

    name = "hypernetwork"
    label = "Hypernetwork"
    config_class = HypernetworkConfig
    default_lr = 1e-5
    layouts = LAYOUTS
    prompt_tag = "hypernet"
    converts = True
    # builtin: measured on the builtin model (BENCHMARKS.md).
    compare_rows = (CompareRow("hypernetwork", "#9467bd", {
        "builtin": {"train": {"steps": 300, "lr": 2.0e-3, "batch_size": 4}},
        "real": {"train": {"steps": 2000, "lr": 1.0e-5, "batch_size": 1}},
    }),)

    def __init__(self, cfg: HypernetworkConfig | None = None):
        self.cfg = cfg or HypernetworkConfig()
        self._facts: dict[str, str] = {}

    # Training -----------------------------------------------------------------------------------------------
    def setup(self, model) -> list[torch.nn.Parameter]:
        """Freeze the model, build fresh modules for the chosen widths and route attention through them."""
        from ..hypernet_modules import HypernetworkNet, stack_of

        structure = structure_of(self.cfg)
        for module in model.components().values():
            module.requires_grad_(False)
        net = HypernetworkNet(structure, widths_for(model, self.cfg.sizes)).initialise().to(model.unet.device)
        net.train()
        stack = stack_of(model)
        if stack.find(TRAIN_NAME) is not None:
            raise SdtuneError("This model already has a hypernetwork in training; load a fresh model.")
        stack.add(TRAIN_NAME, net, 1.0)  # A1111 trains at multiplier 1
        self._facts = fmt_hn.summary(self._file(net, {}, ""))
        return list(net.parameters())

    def _trained(self, model):
        from ..hypernet_modules import STACK_KEY

        stack = model.extras.get(STACK_KEY)
        net = stack.find(TRAIN_NAME) if stack is not None else None
        if net is None:
            raise SdtuneError("No hypernetwork is being trained on this model; call setup first.")
        return net

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        return _cpu_state(self._trained(model))

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        try:
            self._trained(model).load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SdtuneError("Checkpoint does not fit this hypernetwork setup (other widths or layer structure).") \
                from exc

    def metadata(self) -> dict[str, str]:
        return dict(self._facts)

    def _file(self, net, card: dict[str, str], name: str) -> HypernetworkFile:
        """The trained modules as a file, with the entries A1111 writes (in its order) and the run card."""
        s = net.structure
        tensors = _cpu_state(net)
        entries: dict[str, Any] = {
            "step": int(card.get("steps", 0) or 0),
            "name": name,
            "layer_structure": list(s.layer_structure),
            "activation_func": s.activation_func,
            "is_layer_norm": s.is_layer_norm,
            "weight_initialization": s.weight_initialization,
            "sd_checkpoint": card.get("base_hash", "")[:10] or None,
            "sd_checkpoint_name": card.get("base_model") or None,
            "activate_output": s.activate_output,
            "use_dropout": any(p > 0 for p in s.dropout_structure),
            "dropout_structure": list(s.dropout_structure),
            "last_layer_dropout": s.dropout_structure[-2] != 0,
            "optional_info": None,
        }
        return HypernetworkFile(tensors, entries, card)

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        return f'--model {model} --artifacts {out_dir} --prompt "... <hypernet:{name}:1>"'

    def output_files(self, name: str, fmt: str | None = None) -> list[str]:
        """What `save` writes into the output folder."""
        return [f"{name}{FILE_SUFFIX[fmt or self.cfg.format]}"]

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None = None) -> list[Path]:
        """Write NAME.safetensors (sdtune form) or NAME.pt (A1111 layout), atomically."""
        hf = self._file(self._trained(model), card, name)
        return [write_file(hf, Path(out_dir) / self.output_files(name, fmt)[0], fmt or self.cfg.format)]

    # Inference ----------------------------------------------------------------------------------------------
    def decode_file(self, model, tensors, metadata: dict[str, str], path: Path) -> HypernetworkFile:
        """Either file form -> HypernetworkFile (or a clear refusal, also when the run card inside an A1111 .pt
        names another model family: widths alone can fit another family)."""
        from ..generate import check_family

        hf = fmt_hn.read(tensors, metadata, path.name)
        check_family(hf.card, model, path)
        return hf

    def apply(self, model, state, weight: float = 1.0, name: str = "hypernetwork") -> None:
        """Add the hypernetwork to the model's stack (after any already applied), scaled by `weight`."""
        from ..hypernet_modules import HypernetworkNet, attention_widths, stack_of

        hf = state if isinstance(state, HypernetworkFile) else HypernetworkFile(dict(state), _entries(self.cfg))
        net = HypernetworkNet.from_file(hf, f"hypernetwork '{name}'")
        available = attention_widths(model.unet)
        if not set(net.widths) & set(available):
            raise SdtuneError(f"Hypernetwork '{name}' has modules for widths {net.widths} but this model's attention "
                              f"uses {available}; it was made for another model family.")
        net.eval().requires_grad_(False)
        stack_of(model).add(name, net.to(model.unet.device), weight)

    # Conversion ---------------------------------------------------------------------------------------------
    @classmethod
    def recognises(cls, obj, metadata: dict[str, str]) -> bool:
        return fmt_hn.looks_like_a1111(obj) or fmt_hn.looks_like_sdtune(obj, metadata)

    @classmethod
    def convert(cls, obj, metadata: dict[str, str], src: Path, dst: Path, to: str, model_spec: str | None) -> Path:
        """Rewrite a hypernetwork in the other form; tensors, A1111 entries and the run card travel unchanged."""
        return write_file(fmt_hn.read(obj, metadata, src.name), dst, to)


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the modules' tensors (on a meta-device model, their shapes: sizing without memory)."""
    return {k: v.detach().float() if v.is_meta else v.detach().to("cpu", torch.float32).contiguous()
            for k, v in net.state_dict().items()}


def _entries(cfg: HypernetworkConfig) -> dict[str, Any]:
    """A1111 entries describing a config's structure (for bare canonical tensors)."""
    s = structure_of(cfg)
    return {"layer_structure": list(s.layer_structure), "activation_func": s.activation_func,
            "is_layer_norm": s.is_layer_norm, "activate_output": s.activate_output,
            "dropout_structure": list(s.dropout_structure)}


def write_file(hf: HypernetworkFile, path: Path, fmt: str) -> Path:
    """Write `hf` at `path` as the sdtune form (.safetensors) or the A1111 layout (.pt), atomically."""
    from ..artifacts import atomic_write_via, save_artifact

    if fmt == "a1111":
        data = fmt_hn.a1111_bytes(hf)
        return atomic_write_via(path, lambda tmp: tmp.write_bytes(data))
    tensors, header = fmt_hn.to_safetensors(hf)
    return save_artifact(path, tensors, header)
