"""LoCon, LoHa, LoKr and DoRA modules: the update sdtune merges equals what LyCORIS's own modules compute, every
layout of each round-trips bit-exact, and what a layout cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lycoris.modules import LoConModule, LohaModule, LokrModule

from lycoris_oracle import network, randomise
from sdtune.errors import SdtuneError
from sdtune.formats.lora import checked_state, detect_lora_format, from_kohya, to_kohya
from sdtune.formats.lora_diffusers import from_diffusers, to_diffusers
from sdtune.formats.lycoris import CANONICAL_PARAMS, KOHYA_PARAMS, fits, merged_weight, rank, scale
from sdtune.lora_inspection import summary_lines
from sdtune.model import load


def _linear(i=32, o=48):
    return torch.nn.Linear(i, o)


def _conv(i=8, o=16):
    return torch.nn.Conv2d(i, o, 3, padding=1)


# id -> (LyCORIS module class, layer factory, rank, LyCORIS options)
CASES = {
    "locon-linear": (LoConModule, _linear, 4, {}),
    "locon-conv3x3": (LoConModule, _conv, 4, {}),
    "locon-tucker": (LoConModule, _conv, 4, {"use_tucker": True}),
    "loha-linear": (LohaModule, _linear, 4, {}),
    "loha-conv3x3": (LohaModule, _conv, 4, {}),
    "loha-tucker": (LohaModule, _conv, 4, {"use_tucker": True}),
    "lokr-w2-split": (LokrModule, _linear, 4, {"factor": 4}),
    "lokr-both-split": (LokrModule, lambda: _linear(64, 96), 2, {"factor": 8, "decompose_both": True}),
    "lokr-both-full": (LokrModule, _linear, 4, {"full_matrix": True}),
    "lokr-conv-w2-full": (LokrModule, lambda: _conv(16, 32), 4, {"factor": 4}),
    "lokr-conv-w2-split": (LokrModule, lambda: _conv(16, 64), 2, {"factor": 4}),
    "lokr-tucker": (LokrModule, lambda: _conv(16, 64), 2, {"factor": 4, "use_tucker": True}),
    "dora-locon-out": (LoConModule, _linear, 4, {"weight_decompose": True}),
    "dora-locon-in-conv": (LoConModule, _conv, 4, {"weight_decompose": True, "wd_on_out": False}),
    "dora-loha-out-conv": (LohaModule, _conv, 4, {"weight_decompose": True}),
    "dora-loha-in": (LohaModule, _linear, 4, {"weight_decompose": True, "wd_on_out": False}),
    "dora-lokr-out": (LokrModule, _linear, 4, {"factor": 4, "weight_decompose": True}),
    "dora-lokr-in-conv": (LokrModule, lambda: _conv(16, 64), 2, {"factor": 4, "weight_decompose": True,
                                                                   "wd_on_out": False}),
}


def _lycoris_module(case: str, seed: int = 0):
    cls, make, dim, options = CASES[case]
    torch.manual_seed(seed)
    layer = make()
    module = cls("lora_x", layer, multiplier=1.0, lora_dim=dim, alpha=3.0, **options)
    randomise(module, seed)
    params = {CANONICAL_PARAMS[k]: v.detach().clone() for k, v in module.state_dict().items()}
    return layer, module, params


def _run(layer, x, weight=None):
    weight = layer.weight if weight is None else weight
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, padding=layer.padding)
    return F.linear(x, weight, layer.bias)


def _input(layer):
    return torch.randn(2, layer.in_channels, 6, 6) if isinstance(layer, torch.nn.Conv2d) else torch.randn(
        5, layer.in_features)


@pytest.mark.parametrize("case", CASES)
def test_merged_weight_gives_lycoris_own_output(case):
    layer, module, params = _lycoris_module(case)
    assert fits(params, tuple(layer.weight.shape))
    x = _input(layer)
    base = _run(layer, x)
    module.apply_to()
    with torch.no_grad():
        theirs = layer(x)
        ours = _run(layer, x, merged_weight(layer.weight, params, 1.0))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-2, "the update should change the layer"
    assert torch.equal(merged_weight(layer.weight, params, 0.0), layer.weight), "strength 0 is the base exactly"


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("dora")])
def test_strength_scales_the_update_as_lycoris_multiplier_does(case):
    layer, module, params = _lycoris_module(case, seed=1)
    module.multiplier = 0.4
    module.apply_to()
    x = _input(layer)
    with torch.no_grad():
        torch.testing.assert_close(_run(layer, x, merged_weight(layer.weight, params, 0.4)), layer(x), rtol=1e-4,
                                   atol=1e-5)


def test_lokr_scale_is_one_without_a_split_factor_whatever_alpha_says():
    _, _, params = _lycoris_module("lokr-both-full")
    params["alpha"] = torch.tensor(123.0)
    assert rank(params) is None and scale(params) == 1.0
    _, _, split = _lycoris_module("lokr-w2-split")
    assert rank(split) == split["lokr_w2_b"].shape[0] and scale(split) == 3.0 / 4


def test_dora_at_strength_s_moves_the_weight_that_far_towards_the_decomposed_one():
    """A1111's and ComfyUI's rule: W0 + s·(D − W0), so s = 0 is the base and s = 1 is DoRA's weight."""
    layer, _, params = _lycoris_module("dora-locon-out")
    full = merged_weight(layer.weight, params, 1.0)
    torch.testing.assert_close(merged_weight(layer.weight, params, 0.3), layer.weight + 0.3 * (full - layer.weight))


# ------------------------------------------------------------------------------------------ layouts

# id -> (LyCORIS algo, options) of whole networks on tiny models
ALGOS = {"loha": ("loha", {}), "lokr": ("lokr", {"factor": 4}), "locon-tucker": ("lora", {"use_tucker": True}),
         "dora-out": ("lora", {"dora_wd": True}), "dora-in-loha": ("loha", {"dora_wd": True, "wd_on_output": False})}


def _file(family, algo, tmp_path):
    model = load(f"tiny:{family}")
    name, options = ALGOS[algo]
    return model, network(model.unet, model.text_encoders, tmp_path, name, **options).state_dict()


def _paths(model):
    return {c: [n for n, _ in m.named_modules()] for c, m in model.components().items() if c != "vae"}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_files_round_trip_bit_exact_through_sdtune_layout(family, algo, tmp_path):
    model, kohya = _file(family, algo, tmp_path)
    assert detect_lora_format(kohya) == "kohya"
    state = from_kohya(kohya, _paths(model), model.unet.config)
    assert len(state) == len(kohya) and detect_lora_format(state) == "sdtune"
    back = from_kohya(to_kohya(state, model.unet.config), _paths(model), model.unet.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    if family == "sd1":  # kohya writes SD1 in LyCORIS's own (diffusers-style) names: the very same file
        again = to_kohya(state, model.unet.config)
        assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)


@pytest.mark.parametrize("algo, refusal", [
    ("loha", "holds LoRA and DoRA, not LoHa"), ("lokr", "holds LoRA and DoRA, not LoKr"),
    ("locon-tucker", "not LoCon with a Tucker core"), ("dora-in-loha", "not LoHa"),
])
def test_diffusers_layout_refuses_what_peft_cannot_hold(algo, refusal, tmp_path):
    model, kohya = _file("sd1", algo, tmp_path)
    with pytest.raises(SdtuneError, match=rf"{refusal} \(.*\); convert it to kohya"):
        to_diffusers(from_kohya(kohya, _paths(model), model.unet.config))


def test_input_axis_dora_is_refused_for_the_diffusers_layout_by_axis(tmp_path):
    model = load("tiny:sd1")
    net = network(model.unet, model.text_encoders, tmp_path, "lora", dora_wd=True, wd_on_output=False)
    state = from_kohya(net.state_dict(), _paths(model), model.unet.config)
    assert all(v.shape[0] == 1 for k, v in state.items() if k.endswith("dora_scale"))
    with pytest.raises(SdtuneError, match="scales each output feature, but .* scales each input feature"):
        to_diffusers(state)


def test_output_axis_dora_round_trips_through_the_diffusers_layout(tmp_path):
    model, kohya = _file("sdxl", "dora-out", tmp_path)
    state = from_kohya(kohya, _paths(model), model.unet.config)
    tensors, metadata = to_diffusers(state)
    assert '"unet.use_dora": true' in metadata["lora_adapter_metadata"]
    conv = next(k for k in tensors if k.startswith("unet.") and "conv1.lora_magnitude" in k)
    assert tensors[conv].shape[:2] == (1, 32)  # peft's convolution magnitude [1, out, 1, 1]
    back = from_diffusers(tensors, metadata, _paths(model))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_other_lycoris_algorithms_and_damaged_modules_are_refused_by_name(tmp_path):
    model, kohya = _file("sd1", "loha", tmp_path)
    paths = _paths(model)
    first = next(k for k in kohya if k.endswith(".hada_w1_a"))
    with pytest.raises(SdtuneError, match=r"LyCORIS OFT, which sdtune does not apply"):
        from_kohya({**kohya, first.replace("hada_w1_a", "oft_blocks"): torch.zeros(1)}, paths, model.unet.config)
    bent = {**kohya, first: kohya[first][:, :1]}
    with pytest.raises(SdtuneError, match=r"LoRA bent module .* has malformed weights \(hada_w1_a \[\d+, 1\]"):
        checked_state(from_kohya(bent, paths, model.unet.config), "LoRA bent")
    mixed = {**kohya, first.replace("hada_w1_a", "lokr_w1"): torch.zeros(2, 2)}
    with pytest.raises(SdtuneError, match="mixes or lacks LoRA/LoHa/LoKr parameters"):
        checked_state(from_kohya(mixed, paths, model.unet.config))


@pytest.mark.parametrize("algo, expected", [
    ("loha", ("LoHa x", "rank:       4 x", "unet attn x", "text_encoder attn x")),
    ("lokr", ("LoKr x", "full x")),
    ("locon-tucker", ("LoCon (Tucker) x", "LoRA x", "unet ", "conv x")),
    ("dora-in-loha", ("LoHa x", "DoRA x", "one magnitude per input feature")),
])
def test_inspect_names_algorithm_rank_and_layer_groups(algo, expected, tmp_path):
    _, kohya = _file("sd1", algo, tmp_path)
    text = "\n".join(summary_lines((k, tuple(v.shape)) for k, v in kohya.items()))
    for fragment in expected:
        assert fragment in text, (fragment, text)


# ------------------------------------------------------------------------------------ peft's layers

PEFT_CASES = {  # id -> (peft config class name, options); trained LoHa/LoKr will come from these layers
    "loha": ("LoHaConfig", {}),
    "loha-tucker-conv": ("LoHaConfig", {"use_effective_conv2d": True}),
    "lokr": ("LoKrConfig", {}),
    "lokr-both-split": ("LoKrConfig", {"decompose_both": True, "decompose_factor": 4}),
    "lokr-tucker-conv": ("LoKrConfig", {"use_effective_conv2d": True, "decompose_factor": 4}),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_loha_lokr_state_is_the_canonical_state_with_the_same_update(case):
    """peft's parameter names and shapes are the canonical ones (and LyCORIS's file suffixes), and the update
    sdtune merges is peft's own delta, except where a LoKr layer splits neither factor: every client applies it
    at scale 1, while peft scales it by alpha/r (a LoKr trainer folds alpha/r into lokr_w1 there)."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    config_class, options = PEFT_CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Conv2d(16, 64, 3, padding=1))
    config = getattr(peft, config_class)(r=4, alpha=6, target_modules=["0", "1"], init_weights=False, **options)
    peft.inject_adapter_in_model(config, model, adapter_name="a")
    state = peft.get_peft_model_state_dict(model, adapter_name="a")
    checked = 0
    for path in ("0", "1"):
        params = {k.removeprefix(f"{path}."): v for k, v in state.items() if k.startswith(f"{path}.")}
        params["alpha"] = torch.tensor(6.0)
        layer = model.get_submodule(path)
        assert isinstance(layer, BaseTunerLayer) and set(params) <= set(KOHYA_PARAMS)
        base = layer.get_base_layer().weight
        assert fits(params, tuple(base.shape))
        theirs = layer.get_delta_weight("a")
        ours = merged_weight(base, params, 1.0) - base
        if rank(params) is None:
            theirs = theirs / layer.scaling["a"]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == 2


def test_a_1d_dora_scale_is_read_as_one_magnitude_per_output_feature(tmp_path):
    model, kohya = _file("sd1", "dora-out", tmp_path)
    flat = {k: v.flatten() if k.endswith("dora_scale") else v for k, v in kohya.items()}
    state = from_kohya(flat, _paths(model), model.unet.config)
    reference = from_kohya(kohya, _paths(model), model.unet.config)
    assert all(torch.equal(state[k], reference[k]) and state[k].shape == reference[k].shape for k in reference)


def test_convert_refuses_in_one_line_and_inspect_names_the_algorithm(tmp_path, capsys):
    from sdtune.cli import main

    model = load("tiny:sd1")
    path = tmp_path / "hada.safetensors"
    network(model.unet, model.text_encoders, tmp_path, "loha").save_weights(str(path), torch.float32, {})
    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "diffusers", "--model",
                 "tiny:sd1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not LoHa" in err and "convert it to kohya" in err, err
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["inspect", str(path)]) == 0
    assert "algorithm:  LoHa x" in capsys.readouterr().out
