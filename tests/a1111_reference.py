"""AUTOMATIC1111's loading paths, re-implemented from reading its code (stable-diffusion-webui 1.10:
modules/safe.py, modules/textual_inversion/textual_inversion.py, modules/hypernetworks/hypernetwork.py,
modules/infotext_utils.py, modules/images.py), independently of sdtune's code, so tests can say whether a
file sdtune writes is one A1111 opens with no flags, and what A1111 reads from it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

# safe.py: the zip members allowed in a .pt, before 1.7 (torch 1.x zips) and since (torch 2.x adds two).
ALLOWED_NAMES = {
    "1.0": re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"),
    "1.7": re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"),
}
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
# safe.py RestrictedUnpickler.find_class: the only globals a pickle may name.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                   "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("__builtin__", "set"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """safe.py's unpickler: storages come back empty, any global off the list raises."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise Exception(f"global '{module}/{name}' is forbidden")
        if (module, name) == ("__builtin__", "set"):
            return set
        return getattr(importlib.import_module(module), name)


def check_pt(path: Path, release: str = "1.7") -> None:
    """safe.py check_pt: raises where A1111 would print "The file may be malicious" and skip the file."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not ALLOWED_NAMES[release].match(name):
                raise Exception(f"bad file inside {path}: {name}")
        pickles = [n for n in archive.namelist() if DATA_PKL.match(n)]
        if len(pickles) != 1:
            raise Exception(f"{len(pickles)} data.pkl found in {path}")
        with archive.open(pickles[0]) as f:
            RestrictedUnpickler(f).load()


def safe_load(path: Path):
    """safe.py load_with_extra with the check on (A1111's default): check_pt, then torch's full load."""
    check_pt(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_embedding(path: Path, expected_width: int) -> tuple[str, object, int]:
    """textual_inversion.py load_from_file + create_embedding_from_data for a .pt: (name, vec, vectors);
    the name is the file stem, and a width other than the model's means A1111 skips the embedding."""
    name = Path(path).stem
    data = safe_load(path)
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        param_dict = getattr(param_dict, "_parameters", param_dict)
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        vec = next(iter(param_dict.items()))[1].detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) == dict and "clip_g" in data and "clip_l" in data:  # noqa: E721 (A1111's exact test)
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif type(data) == dict and type(next(iter(data.values()))) == torch.Tensor:  # noqa: E721
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if len(emb.shape) == 1 else emb).detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")
    assert shape == expected_width, f"skipped: {shape} wide, the model's embeddings are {expected_width}"
    return name, vec, vectors


# hypernetwork.py HypernetworkModule.activation_dict
ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
               "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
ACTIVATIONS.update({n.lower(): c for n, c in inspect.getmembers(torch.nn.modules.activation)
                    if inspect.isclass(c) and c.__module__ == "torch.nn.modules.activation"})
OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
            "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}


class HypernetworkModule(torch.nn.Module):
    """hypernetwork.py HypernetworkModule built from a file's state dict (load_state_dict is strict)."""

    def __init__(self, dim, state_dict, layer_structure, activation_func, add_layer_norm, activate_output,
                 dropout_structure):
        super().__init__()
        assert layer_structure[0] == 1 and layer_structure[-1] == 1
        layers = []
        for i in range(len(layer_structure) - 1):
            layers.append(torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if not (activation_func == "linear" or activation_func is None
                    or (i >= len(layer_structure) - 2 and not activate_output)):
                if activation_func not in ACTIVATIONS:
                    raise RuntimeError(f"hypernetwork uses an unsupported activation function: {activation_func}")
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                assert 0 < dropout_structure[i + 1] < 1
                layers.append(torch.nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        for old, new in OLD_KEYS.items():
            if old in state_dict:
                state_dict[new] = state_dict.pop(old)
        self.load_state_dict(state_dict)

    def forward(self, x, multiplier=1.0):
        return x + self.linear(x) * multiplier


def parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    if not use_dropout:
        return [0] * len(layer_structure)
    values = [0] + [0.3] * (len(layer_structure) - 3)
    return values + [0.3 if last_layer_dropout else 0, 0]


def load_hypernetwork(path: Path) -> tuple[str, dict[int, tuple[HypernetworkModule, HypernetworkModule]]]:
    """hypernetwork.py Hypernetwork.load (shared.hypernetworks finds the file by its stem): (name, layers)."""
    state = safe_load(path)
    layer_structure = state.get("layer_structure", [1, 2, 1])
    dropout = state.get("dropout_structure", None)
    use_dropout = True if dropout is not None and any(dropout) else state.get("use_dropout", False)
    if dropout is None:
        dropout = parse_dropout_structure(layer_structure, use_dropout, state.get("last_layer_dropout", False))
    args = (layer_structure, state.get("activation_func", None), state.get("is_layer_norm", False),
            state.get("activate_output", True), dropout)
    layers = {size: (HypernetworkModule(size, sd[0], *args), HypernetworkModule(size, sd[1], *args))
              for size, sd in state.items() if type(size) == int}  # noqa: E721
    for pair in layers.values():
        for module in pair:
            module.eval()
    return state.get("name", Path(path).stem), layers


# infotext_utils.py parse_generation_parameters (the part that reads the text; defaults it adds left out).
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_generation_parameters(text: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for key, value in PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = IMAGE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    return res


def read_info_from_image(path: Path) -> str | None:
    """images.py read_info_from_image: the PNG "parameters" chunk, else the EXIF UserComment as piexif
    reads it (the tag must be typed UNDEFINED for piexif to hand back bytes)."""
    from PIL import Image

    items = dict(Image.open(path).info)
    info = items.pop("parameters", None)
    if "exif" in items:
        comment = _exif_user_comment(items["exif"])
        if comment:
            info = comment
    return info


def _exif_user_comment(exif: bytes) -> str | None:
    """piexif.load(...)["Exif"][UserComment] then piexif.helper.UserComment.load, for a little-endian TIFF."""
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    assert tiff[:4] == b"II*\x00"

    def entries(offset):
        (count,) = struct.unpack_from("<H", tiff, offset)
        return [struct.unpack_from("<HHII", tiff, offset + 2 + 12 * i) for i in range(count)]

    exif_ifd = next((value for tag, _, _, value in entries(struct.unpack_from("<I", tiff, 4)[0]) if tag == 0x8769),
                    None)
    if exif_ifd is None:
        return None
    for tag, kind, count, value in entries(exif_ifd):
        if tag == 0x9286:
            assert kind == 7, f"UserComment typed {kind}: piexif would return a tuple of ints, not bytes"
            data = tiff[value:value + count] if count > 4 else struct.pack("<I", value)[:count]
            prefix, body = data[:8], data[8:]
            encoding = {b"ASCII\x00\x00\x00": "ascii", b"JIS\x00\x00\x00\x00\x00": "shift_jis",
                        b"UNICODE\x00": "utf_16_be"}[prefix]
            return body.decode(encoding, errors="replace")
    return None
