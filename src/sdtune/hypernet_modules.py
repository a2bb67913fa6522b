"""Hypernetwork modules and the attention processor that applies them, with AUTOMATIC1111's semantics.

A hypernetwork holds, per context width, a pair of residual MLPs (one for keys, one for values). Each UNet
attention layer passes the context it projects with `to_k` / `to_v` (the text for cross-attention, the hidden
states for self-attention) through the pair of that width; the query is never changed. Several hypernetworks
stack in order, each with its own multiplier. The stack lives in `model.extras` and every attention module's
processor wraps the processor it had, still calling `attn.to_k(...)` / `attn.to_v(...)`, so LoRA layers
injected there keep working and nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SdtuneError
from .formats.hypernetwork import SIDES, WEIGHT_INITS, HypernetworkFile, Structure

STACK_KEY = "hypernetworks"
# A1111's own activation names; every torch.nn activation class is also accepted by its lower-case name.
SHORT_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def activation_table() -> dict[str, type[nn.Module]]:
    """Name -> class, as A1111 resolves `activation_func` (its short names, then torch.nn's classes)."""
    source = nn.modules.activation
    table = dict(SHORT_ACTIVATIONS)
    table.update({name.lower(): cls for name, cls in vars(source).items()
                  if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == source.__name__})
    return table


def make_activation(name: str) -> nn.Module:
    cls = activation_table().get(name)
    if cls is None:
        raise SdtuneError(f"Unknown hypernetwork activation '{name}'; use linear, relu, leakyrelu, elu, swish, tanh, "
                          "sigmoid or another torch.nn activation name in lower case (gelu, silu, mish...).")
    try:
        return cls()
    except TypeError:
        raise SdtuneError(f"Activation '{name}' needs arguments and cannot be used in a hypernetwork.") from None


def build_layers(dim: int, structure: Structure) -> nn.Sequential:
    """A1111's layer sequence: per step Linear, activation (none for linear, none after the last Linear unless
    activate_output), LayerNorm if enabled, Dropout where the dropout structure says so."""
    sizes = structure.widths(dim)
    act = structure.activation_func
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        last = i == len(sizes) - 2
        if act not in (None, "linear") and (structure.activate_output or not last):
            layers.append(make_activation(act))
        if structure.is_layer_norm:
            layers.append(nn.LayerNorm(sizes[i + 1]))
        if structure.dropout_structure[i + 1] > 0:
            layers.append(nn.Dropout(p=float(structure.dropout_structure[i + 1])))
    return nn.Sequential(*layers)


def initialise(layers: nn.Sequential, weight_init: str, activation: str | None) -> None:
    """Fresh weights as A1111 draws them: LayerNorms and 'Normal' from N(0, 0.01), biases zero."""
    if weight_init not in WEIGHT_INITS:
        raise SdtuneError(f"Unknown weight initialisation '{weight_init}'; use one of {', '.join(WEIGHT_INITS)}.")
    gain_for = "leaky_relu" if activation == "leakyrelu" else "relu"
    draw = {
        "Normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01),
        "XavierUniform": nn.init.xavier_uniform_,
        "XavierNormal": nn.init.xavier_normal_,
        "KaimingUniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity=gain_for),
        "KaimingNormal": lambda w: nn.init.kaiming_normal_(w, nonlinearity=gain_for),
    }
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.LayerNorm):
                draw["Normal"](layer.weight)
            elif isinstance(layer, nn.Linear):
                draw[weight_init](layer.weight)
            else:
                continue
            layer.bias.zero_()


class HypernetworkModule(nn.Module):
    """One residual MLP: out = x + mlp(x) * multiplier."""

    def __init__(self, dim: int, structure: Structure):
        super().__init__()
        self.linear = build_layers(dim, structure)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


class HypernetworkNet(nn.ModuleDict):
    """Width -> {k, v} modules; its state-dict keys are the canonical file keys (`768.k.linear.0.weight`)."""

    def __init__(self, structure: Structure, widths: list[int]):
        structure.check()
        super().__init__({str(w): nn.ModuleDict({s: HypernetworkModule(w, structure) for s in SIDES})
                          for w in widths})
        self.structure = structure

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.keys()]

    def pair(self, width: int) -> nn.ModuleDict | None:
        return self._modules.get(str(width))

    def initialise(self) -> "HypernetworkNet":
        for pair in self.values():
            for module in pair.values():
                initialise(module.linear, self.structure.weight_initialization, self.structure.activation_func)
        return self

    @classmethod
    def from_file(cls, hf: HypernetworkFile, what: str = "hypernetwork") -> "HypernetworkNet":
        """Rebuild the exact layer sequences the file's entries describe and load its tensors into them.
        The layers are built without memory (meta device) and take the file's tensors, so entries that
        describe absurd widths cost nothing before they are refused."""
        try:
            with torch.device("meta"):
                net = cls(hf.structure, hf.widths)
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise SdtuneError(f"The {what} settings describe layers that cannot be built ({exc}); the file is "
                              "damaged or its layer_structure entry is wrong.") from exc
        try:
            net.load_state_dict({k: v.float() for k, v in hf.tensors.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            detail = str(exc).split("\n\t")[1].strip() if "\n\t" in str(exc) else str(exc)
            raise SdtuneError(f"The {what} weights do not fit the layer sequence its settings describe ({detail}); "
                              "the file is damaged or its layer_structure/activation/norm entries are wrong.") from exc
        return net


@dataclass
class StackEntry:
    name: str
    net: HypernetworkNet
    weight: float


class HypernetworkStack:
    """The hypernetworks applied to one model, in order; each attention context passes through all of them."""

    def __init__(self) -> None:
        self.entries: list[StackEntry] = []

    def add(self, name: str, net: HypernetworkNet, weight: float) -> None:
        self.entries.append(StackEntry(name, net, float(weight)))

    def find(self, name: str) -> HypernetworkNet | None:
        return next((e.net for e in self.entries if e.name == name), None)

    def clear(self) -> None:
        """Remove every hypernetwork; the processors then compute exactly the base attention."""
        self.entries.clear()

    def active(self) -> bool:
        return any(e.weight != 0 for e in self.entries)

    def transform(self, context: torch.Tensor, side: str) -> torch.Tensor:
        """The context after each hypernetwork's `side` module of its width (computed in the modules' dtype)."""
        for entry in self.entries:
            pair = entry.net.pair(context.shape[-1])
            if pair is None or entry.weight == 0:
                continue
            module = pair[side]
            param = next(module.parameters())
            if param.device != context.device:
                entry.net.to(context.device)
            context = module(context.to(param.dtype), entry.weight).to(context.dtype)
        return context


class _Projection:
    """`attn.to_k` / `attn.to_v` as the wrapped processor sees it: the stack first, then the real layer."""

    def __init__(self, layer, stack: HypernetworkStack, side: str):
        self._layer, self._stack, self._side = layer, stack, side

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._layer(self._stack.transform(x, self._side), *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._layer, name)


class _AttentionView:
    """An attention module with to_k / to_v replaced by `_Projection`s; everything else is the module's own."""

    def __init__(self, attn, stack: HypernetworkStack):
        self._attn = attn
        self.to_k = _Projection(attn.to_k, stack, "k")
        self.to_v = _Projection(attn.to_v, stack, "v")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._attn, name)


class HypernetworkProcessor:
    """Wraps an attention processor (SDPA by default): same computation, hypernetwork-transformed k/v context."""

    def __init__(self, inner, stack: HypernetworkStack):
        self.inner, self.stack = inner, stack

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        view = _AttentionView(attn, self.stack) if self.stack.active() else attn
        return self.inner(view, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def _attention_modules(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def attention_widths(unet: nn.Module) -> list[int]:
    """Context widths the UNet's attention layers feed to to_k: text widths first, then self-attention
    widths ascending (SD1 gives A1111's default 768, 320, 640, 1280)."""
    cross, own = set(), set()
    for attn in _attention_modules(unet):
        (cross if attn.is_cross_attention else own).add(int(attn.to_k.in_features))
    return sorted(cross) + sorted(own - cross)


def stack_of(model) -> HypernetworkStack:
    """The model's hypernetwork stack, with every UNet attention processor wrapped to use it."""
    stack = model.extras.get(STACK_KEY)
    if stack is None:
        stack = model.extras[STACK_KEY] = HypernetworkStack()
    for attn in _attention_modules(model.unet):
        processor = attn.processor
        if isinstance(processor, HypernetworkProcessor):
            if processor.stack is stack:
                continue
            processor = processor.inner
        attn.set_processor(HypernetworkProcessor(processor, stack))
    return stack
