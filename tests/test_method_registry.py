"""The registry is the only list of methods: a method registered at test time, with no other code change, is
trained by the CLI and listed in its --help, offered by the web UI's menu and by bench, given a compare row,
named by inspect, converted by convert and applied by its prompt tag. Registration refuses what is no method.
The recorded recipes and the defaults they give `sdtune train` stay what they were."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import methods
from sdtune.artifacts import load_artifact, save_artifact
from sdtune.cli import main
from sdtune.config import opt
from sdtune.errors import SdtuneError
from sdtune.formats import Layout, matching_layout

KEY = "unet.conv_out.bias"


@dataclass
class OutputBiasConfig:
    """The dummy's settings."""

    format: str = opt("plain", "file layout written", choices=("plain", "packed"))


class OutputBias(methods.Method):
    """A dummy method: it trains the UNet's last bias; <bias:NAME:W> moves a model's bias W of the way there."""

    name = "output-bias"
    label = "Output bias"
    config_class = OutputBiasConfig
    default_lr = 1e-2
    layouts = (Layout("plain", "Output bias (plain)", keys=r"unet\.conv_out\.bias"),
               Layout("packed", "Output bias (packed)", keys="packed", max_keys=1))
    prompt_tag = "bias"
    converts = True
    compare_rows = (methods.CompareRow("output-bias", "#000000", {"builtin": {"train": {"steps": 2}}}),)

    def __init__(self, cfg: OutputBiasConfig | None = None):
        self.cfg = cfg or OutputBiasConfig()

    def setup(self, model) -> list[torch.nn.Parameter]:
        for module in model.components().values():
            module.requires_grad_(False)
        return [model.unet.conv_out.bias.requires_grad_(True)]

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        return {KEY: model.unet.conv_out.bias.detach().to("cpu", torch.float32).clone()}

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model.unet.conv_out.bias.copy_(state[KEY])

    def metadata(self) -> dict[str, str]:
        return {}

    def output_files(self, name: str, fmt: str | None = None) -> list[str]:
        return [f"{name}.safetensors"]

    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None = None) -> list[Path]:
        return [save_artifact(Path(out_dir) / f"{name}.safetensors", _encode(self.state_dict(model),
                                                                           fmt or self.cfg.format), card)]

    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        return f'--model {model} --artifacts {out_dir} --prompt "a {token} <bias:{name}:1>"'

    def apply(self, model, state, weight: float = 1.0, name: str = "") -> None:
        with torch.no_grad():
            model.unet.conv_out.bias.lerp_(state[KEY], weight)

    def decode_file(self, model, obj, metadata: dict[str, str], path: Path):
        return {KEY: obj.get(KEY, obj.get("packed"))}

    @classmethod
    def recognises(cls, obj, metadata: dict[str, str]) -> bool:
        return matching_layout(obj, cls.layouts) is not None

    @classmethod
    def convert(cls, obj, metadata: dict[str, str], src: Path, dst: Path, to: str, model_spec: str | None) -> Path:
        return save_artifact(dst, _encode(cls().decode_file(None, obj, metadata, src), to), metadata)


def _encode(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    return state if fmt == "plain" else {"packed": state[KEY]}


@pytest.fixture
def registered(monkeypatch):
    """The dummy registered in a copy of the registry: nothing is left behind for other tests."""
    monkeypatch.setattr(methods, "_REGISTRY", methods._REGISTRY.copy())
    methods.register(OutputBias)
    yield OutputBias
    monkeypatch.undo()
    assert OutputBias.name not in methods.registry()


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_a_registered_method_is_everywhere_without_another_code_change(registered, subject_dir, tmp_path, capsys):
    # The CLI: a train subcommand with the method's own flags, the prompt tag and the layouts in the help.
    assert "output-bias" in _help(capsys, "train") and "Output bias" in _help(capsys)
    assert "one of: plain, packed; default: plain" in _help(capsys, "train", "output-bias")
    assert "<bias:NAME:W>" in _help(capsys, "generate")
    assert "plain" in _help(capsys, "convert") and "output-bias" in _help(capsys, "bench")
    out = tmp_path / "out"
    assert main(["train", "output-bias", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks",
                 "--class-word", "dog", "--steps", "2", "--log-dir", "none", "--output", str(out), "--quiet"]) == 0
    trained = out / "sks.safetensors"
    assert capsys.readouterr().out.split() == [str(trained)]

    # inspect names its layout; convert dispatches to it and refuses a layout it has not.
    assert main(["inspect", str(trained)]) == 0
    assert "format:     Output bias (plain)" in capsys.readouterr().out
    packed = tmp_path / "packed.safetensors"
    assert main(["convert", str(trained), str(packed), "--to", "packed"]) == 0
    assert main(["inspect", str(packed)]) == 0 and "format:     Output bias (packed)" in capsys.readouterr().out
    assert torch.equal(load_artifact(packed)[0]["packed"], load_artifact(trained)[0][KEY])
    assert main(["convert", str(trained), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 2
    assert capsys.readouterr().err.strip() == \
        "sdtune: error: Output bias files convert to plain, packed, not kohya."

    # generate applies it by its tag: weight 0 is the base image, weight 1 is not.
    images = {}
    for tag in ("", "<bias:sks:0>", "<bias:sks:1>"):
        assert main(["generate", "--model", "tiny:sd1", "--artifacts", str(out), "--prompt", f"a sks dog {tag}",
                     "--steps", "2", "--output", str(tmp_path / f"{len(images)}.png")]) == 0
        images[tag] = np.asarray(Image.open(tmp_path / f"{len(images)}.png"))
    assert np.array_equal(images[""], images["<bias:sks:0>"])
    assert not np.array_equal(images[""], images["<bias:sks:1>"])
    assert f"using bias sks (weight 1) from {trained}" in capsys.readouterr().err


def test_the_ui_bench_and_compare_offer_a_registered_method(registered, tmp_path, capsys):
    pytest.importorskip("gradio")
    from sdtune.compare.plots import colour_table
    from sdtune.compare.recipes import load_plan
    from sdtune.ui.app import build_blocks, make_state

    blocks = build_blocks(make_state("tiny:sd1", tmp_path / "ws"))
    (menu,) = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "train-method"]
    assert "output-bias" in [value for _, value in menu.choices]

    assert main(["bench", "--json", "--model", "tiny:sd1", "--method", "output-bias", "--steps", "1",
                 "--warmup", "1"]) == 0
    (run,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert run["method"] == "output-bias" and run["error"] is None and run["trainable_params"] == 4

    prompts = (("a {token} circle",), ("a circle",))
    rows = {row.name: row for row in load_plan("builtin", "sks", "circle", "all", None, prompts).rows}
    assert rows["output-bias"].method == "output-bias" and rows["output-bias"].train == {"steps": 2}
    assert [r.name for r in load_plan("builtin", "sks", "circle", "output-bias", None, prompts).rows] == \
        ["base", "output-bias"]
    assert colour_table(list(rows))["output-bias"] == "#000000"


class _Unfinished(methods.Method):
    name, label, config_class, default_lr = "unfinished", "Unfinished", OutputBiasConfig, 1e-3


class _TagThief(OutputBias):
    name = "tag-thief"
    prompt_tag = "lyco"


@pytest.mark.parametrize("classes,words", [
    ((_Unfinished,), "does not implement apply, load_state_dict"),
    ((OutputBias, OutputBias), "the name 'output-bias' is taken"),
    ((_TagThief,), "the prompt tag 'lyco' is taken"),
    ((int,), "a method is a subclass of sdtune.methods.Method"),
], ids=["abstract", "duplicate", "tag", "not-a-method"])
def test_registration_refuses_what_is_no_method_in_one_sentence(monkeypatch, classes, words):
    monkeypatch.setattr(methods, "_REGISTRY", methods._REGISTRY.copy())
    for cls in classes:
        methods.register(cls)
    with pytest.raises(SdtuneError) as refused:
        methods.registry()
    assert words in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_the_cli_names_a_method_registered_by_mistake_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(methods, "_REGISTRY", methods._REGISTRY.copy())
    methods.register(_Unfinished)
    assert main(["--help"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "sdtune: error: Method '_Unfinished' cannot be registered: it does not implement apply, load_state_dict, "
        "metadata, output_files, save, setup, state_dict, usage."]


def test_the_recorded_recipes_give_train_the_same_defaults():
    from sdtune.compare.recipes import command_defaults, describe_defaults, training_defaults

    shared = {"use_captions": True, "num_class_images": 56, "class_image_steps": 20}
    assert training_defaults("builtin", "lora") == {
        "data": shared, "train": {"steps": 400, "lr": 0.005, "batch_size": 4}, "lora": {"rank": 8, "targets": "attn,conv"}}
    assert training_defaults("builtin", "textual-inversion") == {
        "data": {**shared, "token": "<sks>"}, "train": {"steps": 300, "lr": 0.05, "batch_size": 4},
        "textual-inversion": {"init_word": "{class_word}"}}
    assert training_defaults("builtin", "dreambooth")["train"] == {"steps": 450, "lr": 0.0002, "batch_size": 4,
                                                                   "prior_preservation": True}
    assert training_defaults("tiny:sd1", "hypernetwork") == {}
    assert describe_defaults(training_defaults("builtin", "hypernetwork")) == \
        "use_captions True, num_class_images 56, class_image_steps 20, steps 300, lr 0.002, batch_size 4"
    assert command_defaults("tiny:sd1", "lora")["train"]["steps"] == 500
    assert command_defaults("builtin", "dreambooth")["dreambooth"]["save_dtype"] == "fp32"
