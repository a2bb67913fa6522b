"""Test helpers for hypernetworks, written from A1111's rules independently of sdtune's code: A1111 `.pt` files
saved as A1111 saves them (torch.save of a dict of width -> (k, v) module state dicts, from layer sequences
spelled out by hand), a functional forward of one module, and an attention processor that computes
attention by hand with the hypernetwork chain applied to k/v."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

# Activation name as stored in a file -> (the torch.nn class A1111 builds, its function).
ACTIVATIONS = {
    "relu": (torch.nn.ReLU, F.relu),
    "leakyrelu": (torch.nn.LeakyReLU, F.leaky_relu),
    "swish": (torch.nn.Hardswish, F.hardswish),
    "gelu": (torch.nn.GELU, F.gelu),
    "tanh": (torch.nn.Tanh, torch.tanh),
    "elu": (torch.nn.ELU, F.elu),
}


class A1111Module(torch.nn.Module):
    """The attribute layout of A1111's HypernetworkModule (`self.linear`, a Sequential), or with `old` that of
    the first hypernetworks (`linear1`, `linear2`), so state_dict() gives the keys and metadata A1111 saved."""

    def __init__(self, layers: list[torch.nn.Module], old: bool = False):
        super().__init__()
        if old:
            self.linear1, self.linear2 = layers
        else:
            self.linear = torch.nn.Sequential(*layers)


def make_state(width: int, spec: list[tuple], generator: torch.Generator, old: bool = False,
               dtype: torch.dtype = torch.float32) -> OrderedDict:
    """One module's state dict (as nn.Module.state_dict() returns it) for a hand-written layer sequence."""
    layers, features = [], width
    for kind, arg in spec:
        if kind == "linear":
            layers.append(torch.nn.Linear(int(width * arg[0]), int(width * arg[1])))
            features = int(width * arg[1])
        elif kind == "act":
            layers.append(ACTIVATIONS[arg][0]())
        elif kind == "norm":
            layers.append(torch.nn.LayerNorm(features))
        else:
            layers.append(torch.nn.Dropout(arg))
    module = A1111Module(layers, old)
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.4)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
            elif isinstance(layer, torch.nn.LayerNorm):
                layer.weight.copy_(1 + 0.2 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
    return module.to(dtype).state_dict()


def build_file(path: Path, widths: list[int], entries: dict, spec: list[tuple], seed: int = 0,
               old: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Write an A1111 hypernetwork file the way its Hypernetwork.save does (torch.save of a plain dict);
    return {width: {"k": state, "v": state}} with linear1/linear2 already renamed."""
    generator = torch.Generator().manual_seed(seed)
    obj: dict = {}
    states: dict = {}
    for width in widths:
        k, v = make_state(width, spec, generator, old, dtype), make_state(width, spec, generator, old, dtype)
        obj[width] = (k, v)
        states[width] = {side: {key.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): t
                                for key, t in s.items()} for side, s in (("k", k), ("v", v))}
    obj.update(entries)
    torch.save(obj, path)
    return states


def expected_types(spec: list[tuple]) -> list[tuple]:
    """(class, extra) per layer of a hand-written sequence, to compare with the built nn.Sequential."""
    out = []
    for kind, arg in spec:
        if kind == "linear":
            out.append((torch.nn.Linear, None))
        elif kind == "act":
            out.append((ACTIVATIONS[arg][0], None))
        elif kind == "norm":
            out.append((torch.nn.LayerNorm, None))
        else:
            out.append((torch.nn.Dropout, arg))
    return out


def reference_forward(x: torch.Tensor, spec: list[tuple], state: dict, multiplier: float) -> torch.Tensor:
    """x + mlp(x) * multiplier, computed layer by layer from the hand-written sequence (dropout off)."""
    y = x.float()
    for index, (kind, arg) in enumerate(spec):
        weight = state.get(f"linear.{index}.weight")
        bias = state.get(f"linear.{index}.bias")
        if kind == "linear":
            y = F.linear(y, weight.float(), bias.float())
        elif kind == "act":
            y = ACTIVATIONS[arg][1](y)
        elif kind == "norm":
            y = F.layer_norm(y, (y.shape[-1],), weight.float(), bias.float(), eps=1e-5)
    return x + y * multiplier


class ReferenceAttention:
    """Attention by hand: q from the hidden states, k/v from the context after each (spec, states, multiplier)
    hypernetwork of the chain, in order, chosen by the context width."""

    def __init__(self, chain: list[tuple[list[tuple], dict, float]]):
        self.chain = chain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert attention_mask is None and not attn.residual_connection and attn.group_norm is None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = context
        for spec, states, multiplier in self.chain:
            width = context.shape[-1]
            if width in states and multiplier != 0:
                ck = reference_forward(ck, spec, states[width]["k"], multiplier)
                cv = reference_forward(cv, spec, states[width]["v"], multiplier)
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        batch, heads = q.shape[0], attn.heads
        q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, -1, q.shape[-1] * heads)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
