"""The bad-input catalogue: every entry is one CLI command on a bad input. Each must exit non-zero with ONE
line that names the input (and says what to do), print no traceback, write nothing, run no code from a
file, and leave /dev/full a character device. tests/test_cli.py holds the first few cases (missing, empty,
non-image, truncated and zero-byte image folders, unknown model, negative steps, rank 0, NaN lr, SDXL LoRA
on SD1, output under a file); this catalogue adds the rest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from sdtune.cli import main

TRAIN = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--class-word", "dog", "--steps", "1",
         "--quiet", "--log-dir", "none"]
GENERATE = ["generate", "--model", "tiny:sd1", "--steps", "1"]
KOHYA_SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@dataclass
class Env:
    tmp: Path
    subject: Path
    pipeline: Path
    monkeypatch: pytest.MonkeyPatch
    marker: Path = field(init=False)

    def __post_init__(self):
        self.marker = self.tmp / "code-ran"

    def folder(self, name: str, files: dict[str, Callable[[Path], object]]) -> Path:
        """A folder of files, each made by its writer."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, write in files.items():
            write(folder / file_name)
        return folder

    def images(self, name: str = "images", **extra: Callable[[Path], object]) -> Path:
        """The subject images plus `extra` files."""
        folder = self.folder(name, extra)
        for source in self.subject.iterdir():
            shutil.copy(source, folder / source.name)
        return folder

    def train(self, *args: str, images: Path | None = None) -> list[str]:
        return TRAIN + ["--images", str(images or self.subject), "--output", str(self.tmp / "out"), *args]

    def generate(self, prompt: str, artifacts: Path, *args: str) -> list[str]:
        return GENERATE + ["--prompt", prompt, "--artifacts", str(artifacts), "--output", str(self.tmp / "o.png"),
                           *args]


class _Payload:
    """Unpickled without weights_only, this creates the marker file: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _code_pickle(env: Env, obj: dict | None = None) -> Callable[[Path], None]:
    return lambda path: torch.save({**(obj or {"w": torch.zeros(2)}), "x": _Payload(env.marker)}, path)


def _image(size: tuple[int, int], mode: str = "RGB") -> Callable[[Path], None]:
    return lambda path: Image.new(mode, size).save(path)


def _corrupt_jpeg(path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    data = bytearray(path.read_bytes())
    data[200:-10] = bytes((b * 7 + 3) & 0xFF for b in data[200:-10])
    path.write_bytes(bytes(data))


def _tensors(tensors: dict, metadata: dict | None = None) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, path, metadata=metadata)


def _lora_sd1(rank: int = 2, out: int = 32) -> dict:
    return {f"{KOHYA_SD1}.lora_down.weight": torch.zeros(rank, 32),
            f"{KOHYA_SD1}.lora_up.weight": torch.zeros(out, rank),
            f"{KOHYA_SD1}.alpha": torch.tensor(float(rank))}


def _hypernetwork(widths=(32, 64), **entries) -> Callable[[Path], None]:
    """An A1111 .pt hypernetwork with layer structure 1,2,1 (two Linears), entries overridable."""
    def side(w: int) -> dict:
        return {"linear.0.weight": torch.zeros(2 * w, w), "linear.0.bias": torch.zeros(2 * w),
                "linear.1.weight": torch.zeros(w, 2 * w), "linear.1.bias": torch.zeros(w)}

    obj = {w: (side(w), side(w)) for w in widths}
    obj.update({"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False, **entries})
    return lambda path: torch.save(obj, path)


def _header(length: int | None, header: dict, data: bytes = b"\0" * 12) -> Callable[[Path], None]:
    raw = json.dumps(header).encode()
    return lambda path: path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _pipeline_copy(env: Env, name: str) -> Path:
    folder = env.tmp / name
    shutil.copytree(env.pipeline, folder)
    return folder


def _custom_code_pipeline(env: Env) -> Path:
    folder = _pipeline_copy(env, "custom")
    (folder / "evil_unet.py").write_text(f"open({str(env.marker)!r}, 'w').close()\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["evil_unet", "EvilUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _broken_index_pipeline(env: Env) -> Path:
    folder = _pipeline_copy(env, "broken")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    return folder


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _enospc_at(env: Env, target: str) -> None:
    """Make the next write of one kind fail as a full disk would (works as root, unlike file modes)."""
    from sdtune import artifacts

    if target == "safetensors":
        env.monkeypatch.setattr(artifacts.st, "save_file", _no_space)
    elif target == "image":
        env.monkeypatch.setattr(Image.Image, "save", _no_space)


def _device_symlink(env: Env) -> Path:
    link = env.tmp / "dev-full.safetensors"
    link.symlink_to("/dev/full")
    return link


# id -> (argv builder, fragments the one-line message must hold)
CATALOGUE: dict[str, tuple[Callable[[Env], list[str]], tuple[str, ...]]] = {
    # Images: refused by name, before a model is loaded.
    "image-corrupt-jpeg": (lambda e: e.train(images=e.images(**{"bad.jpg": _corrupt_jpeg})), ("bad.jpg",)),
    "image-1x1": (lambda e: e.train(images=e.images(**{"dot.png": _image((1, 1))})), ("dot.png", "1x1", "larger")),
    "image-huge": (lambda e: e.train(images=e.images(**{"wide.png": _image((16385, 8), "L")})),
                   ("wide.png", "16384", "downscale")),
    "image-folder-is-a-file": (lambda e: e.train(images=e.subject / "subject_0.png"), ("subject_0.png", "folder")),
    "caption-not-utf8": (lambda e: e.train("--use-captions", images=e.images(
        **{"subject_0.txt": lambda p: p.write_bytes(b"\xff\xfe\xfa caption")})), ("subject_0.txt", "UTF-8")),
    "class-images-is-a-file": (lambda e: ["train", "dreambooth", *e.train("--prior-preservation", "--class-images",
                                                                         str(e.subject / "subject_1.png"))[2:]],
                               ("subject_1.png", "folder")),
    # Models.
    "model-file-missing": (lambda e: e.train("--model", str(e.tmp / "gone.safetensors")), ("gone.safetensors",)),
    "model-file-not-a-checkpoint": (lambda e: e.train("--model", str(e.folder("m", {
        "model.safetensors": _tensors({"a": torch.zeros(1)})}) / "model.safetensors")),
        ("model.safetensors", "not a Stable Diffusion checkpoint")),
    "model-ckpt-with-code": (lambda e: e.train("--model", str(e.folder("m", {"evil.ckpt": _code_pickle(
        e, {"state_dict": {"a": torch.zeros(1)}})}) / "evil.ckpt"), "--model-config", str(e.pipeline)),
        ("evil.ckpt",)),
    "model-folder-with-custom-code": (lambda e: e.train("--model", str(_custom_code_pipeline(e))), ("custom",)),
    "model-index-broken": (lambda e: e.train("--model", str(_broken_index_pipeline(e))), ("broken",)),
    # Artifacts for another model, damaged, or carrying code.
    "lora-sd1-on-sdxl": (lambda e: e.generate("a dog <lora:one>", e.folder("a", {"one.safetensors": _tensors(
        _lora_sd1(), {"ss_base_model_version": "sd_v1"})}), "--model", "tiny:sdxl"),
        ("one.safetensors", "sd1", "sdxl")),
    "lora-malformed-shapes": (lambda e: e.generate("a dog <lora:bent>", e.folder("a", {
        "bent.safetensors": _tensors({**_lora_sd1(), f"{KOHYA_SD1}.lora_up.weight": torch.zeros(32, 3)})})),
        ("bent", "malformed")),
    "lora-wrong-output-width": (lambda e: e.generate("a dog <lora:wide>", e.folder("a", {
        "wide.safetensors": _tensors(_lora_sd1(out=48))})), ("wide", "does not fit", "another model")),
    "lora-damaged-adapter-header": (lambda e: e.generate("a dog <lora:peft>", e.folder("a", {
        "peft.safetensors": _tensors({k.replace(KOHYA_SD1, "unet.x").replace("lora_down", "lora_A").replace(
            "lora_up", "lora_B"): v for k, v in _lora_sd1().items() if "alpha" not in k},
            {"lora_adapter_metadata": '{"unet.lora_alpha": "big"}'})})), ("lora_adapter_metadata", "big", "re-export")),
    "lora-adapter-header-backtracking-pattern": (lambda e: e.generate("a dog <lora:slow>", e.folder("a", {
        "slow.safetensors": _tensors({k.replace(KOHYA_SD1, "unet.x").replace("lora_down", "lora_A").replace(
            "lora_up", "lora_B"): v for k, v in _lora_sd1().items() if "alpha" not in k},
            {"lora_adapter_metadata": '{"unet.alpha_pattern": {"(.*a)+$": 2}}'})})),
        ("lora_adapter_metadata", "alpha_pattern", "re-export")),
    "lora-tag-names-a-hypernetwork": (lambda e: e.generate("a dog <lora:hn>", e.folder("a", {
        "hn.pt": _hypernetwork()})), ("hn.pt", "LoRA")),
    "embedding-1024-on-sd1": (lambda e: e.generate("a emb dog", e.folder("a", {
        "emb.safetensors": _tensors({"emb_params": torch.zeros(1, 1024)})})), ("emb", "1024", "SD 2.x")),
    "embedding-sdxl-on-sd1": (lambda e: e.generate("a emb dog", e.folder("a", {
        "emb.safetensors": _tensors({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})})),
        ("emb", "clip_l/clip_g")),
    "hypernetwork-width-missing": (lambda e: e.generate("a dog <hypernet:hn>", e.folder("a", {
        "hn.pt": _hypernetwork(widths=(768,))})), ("hn", "768")),
    "hypernetwork-unknown-activation": (lambda e: e.generate("a dog <hypernet:hn>", e.folder("a", {
        "hn.pt": _hypernetwork(activation_func="nosuch")})), ("nosuch", "activation")),
    "hypernetwork-bad-layer-structure": (lambda e: e.generate("a dog <hypernet:hn>", e.folder("a", {
        "hn.pt": _hypernetwork(layer_structure=[2, 1])})), ("Layer structure", "start and end with 1")),
    "hypernetwork-absurd-structure": (lambda e: e.generate("a dog <hypernet:hn>", e.folder("a", {
        "hn.pt": _hypernetwork(layer_structure=[1, 10**9, 1])})), ("hn", "do not fit")),
    "safetensors-truncated": (lambda e: e.generate("a dog <lora:cut>", e.folder("a", {
        "cut.safetensors": lambda p: p.write_bytes(save(_lora_sd1())[:-9])})), ("cut.safetensors", "truncated")),
    "safetensors-absurd-header-length": (lambda e: ["inspect", str(e.folder("a", {
        "big.safetensors": _header(2**62, {})}) / "big.safetensors")], ("big.safetensors", "corrupt")),
    "safetensors-absurd-offsets": (lambda e: ["inspect", str(e.folder("a", {"far.safetensors": _header(
        None, {"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}})}) / "far.safetensors")],
        ("far.safetensors", "corrupt")),
    "pt-with-code-in-generate": (lambda e: e.generate("a dog <hypernet:evil>", e.folder("a", {
        "evil.pt": _code_pickle(e)})), ("evil.pt", "code")),
    "pt-with-code-in-convert": (lambda e: ["convert", str(e.folder("a", {"evil.pt": _code_pickle(e)}) / "evil.pt"),
                                           str(e.tmp / "x.safetensors"), "--to", "sdtune"], ("evil.pt", "code")),
    "ckpt-with-code-in-inspect": (lambda e: ["inspect", str(e.folder("a", {"evil.ckpt": _code_pickle(e)})
                                                            / "evil.ckpt")], ("evil.ckpt", "code")),
    "artifact-unknown-extension": (lambda e: ["convert", str(e.subject / "subject_0.png"), str(e.tmp / "x.pt")],
                                   ("subject_0.png", ".safetensors")),
    "prompt-artifact-not-found": (lambda e: e.generate("a dog <lora:nothere>", e.subject), ("nothere", "not found")),
    "prompt-tag-weight-not-a-number": (lambda e: e.generate("a dog <lora:x:abc>", e.subject), ("abc", "number")),
    # Settings: the message names the field and the allowed values.
    "method-unknown": (lambda e: ["train", "dreamboat", "--output", str(e.tmp / "out")],
                       ("dreamboat", "lora", "--help")),
    "flag-not-a-number": (lambda e: e.train("--steps", "ten"), ("--steps", "ten")),
    "lr-infinite": (lambda e: e.train("--lr", "inf"), ("train.lr", "between")),
    "batch-size-zero": (lambda e: e.train("--batch-size", "0"), ("train.batch_size", "at least 1")),
    "lora-dropout-above-range": (lambda e: e.train("--dropout", "1.5"), ("lora.dropout", "between 0.0 and 0.99")),
    "ti-vectors-zero": (lambda e: ["train", "textual-inversion", *e.train("--vectors", "0")[2:]],
                        ("textual-inversion.vectors", "between 1 and 64")),
    "hypernetwork-activation-flag": (lambda e: ["train", "hypernetwork", *e.train("--activation", "nosuch")[2:]],
                                     ("nosuch", "relu")),
    "fp16-on-cpu": (lambda e: e.train("--mixed-precision", "fp16", "--device", "cpu"), ("fp16", "bf16")),
    "config-section-not-a-mapping": (lambda e: e.train("--config", str(e.folder("c", {
        "run.yaml": lambda p: p.write_text("train: 5\n")}) / "run.yaml")), ("run.yaml", "'train'", "mapping")),
    "config-value-wrong-type": (lambda e: e.train("--config", str(e.folder("c", {
        "run.toml": lambda p: p.write_text('[train]\nwarmup_steps = "soon"\n')}) / "run.toml")),
        ("train.warmup_steps", "number")),
    "resume-not-a-checkpoint": (lambda e: e.train("--resume", str(e.subject)), ("subject", "--resume latest")),
    "extract-lora-rank-zero": (lambda e: ["extract-lora", "--base", "tiny:sd1", "--tuned", "tiny:sd1", "--rank", "0",
                                          "--output", str(e.tmp / "x.safetensors")], ("--rank", "at least 1")),
    # Outputs that cannot be written (simulated in ways that work as root).
    "generate-output-under-a-file": (lambda e: e.generate("a dog", e.subject, "--output",
                                                          str(e.subject / "subject_0.png" / "o.png")),
                                     ("subject_0.png", "file")),
    "generate-output-dev-full": (lambda e: e.generate("a dog", e.subject, "--output", "/dev/full"),
                                 ("/dev/full", "image extension")),
    "convert-output-symlink-to-dev-full": (lambda e: ["convert", str(e.folder("a", {"one.safetensors": _tensors(
        _lora_sd1())}) / "one.safetensors"), str(_device_symlink(e)), "--to", "kohya", "--model", "tiny:sd1"],
        ("dev-full.safetensors", "regular file")),
    "disk-full-saving-the-artifact": (lambda e: (_enospc_at(e, "safetensors"), e.train())[1],
                                      ("sks.safetensors", "disk is full")),
    "disk-full-saving-a-checkpoint": (lambda e: (_enospc_at(e, "safetensors"), e.train(
        "--steps", "2", "--checkpoint-every", "1"))[1], ("trainable.safetensors", "disk is full")),
    "disk-full-saving-an-image": (lambda e: (_enospc_at(e, "image"), e.generate("a dog", e.subject))[1],
                                  ("o.png", "disk is full")),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root (symlinks included, not followed) with its size and modification time."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("entry", list(CATALOGUE))
def test_bad_input_is_refused_in_one_line_and_writes_nothing(entry, tmp_path, subject_dir, tiny_pipeline_dirs,
                                                             capsys, monkeypatch):
    build, fragments = CATALOGUE[entry]
    env = Env(tmp_path, subject_dir, tiny_pipeline_dirs["sd1"], monkeypatch)
    argv = build(env)
    before = _snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (unknown method, a flag that is not a number)
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _snapshot(tmp_path) == before, "a failed command left files behind"
    assert not env.marker.exists(), "code from a file ran"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "/dev/full was replaced"


def test_the_catalogue_has_at_least_thirty_entries():
    assert len(CATALOGUE) >= 30


def test_awkward_image_modes_are_converted_and_train(tmp_path, capsys):
    """CMYK, 16-bit, palette (with transparency) and alpha images are converted to RGB, not refused."""
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.new("CMYK", (32, 32), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("I;16", (32, 32), 50000).save(folder / "deep.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (32, 32), (10, 200, 10, 128)).save(folder / "alpha.png")
    out = tmp_path / "out"
    assert main(TRAIN + ["--images", str(folder), "--output", str(out), "--steps", "2"]) == 0
    card = json.loads(out.joinpath("sks.config.json").read_text())
    assert card["DataConfig"]["images"] == str(folder)
    from sdtune.artifacts import load_artifact

    tensors, metadata = load_artifact(out / "sks.safetensors")
    assert tensors and float(metadata["final_loss"]) == float(metadata["final_loss"])  # trained, finite loss
