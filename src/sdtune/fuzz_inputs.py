"""The inputs `python -m sdtune.fuzz` feeds to sdtune's readers of untrusted data, as hypothesis strategies.

Inputs are built three ways: random bytes, mutations of valid files sdtune writes itself (flips, cuts,
insertions, boundary integers), and structured values (key names, shapes, dtypes and entries drawn from
the vocabulary real files use), so the fuzzer reaches the decoders, not only the first magic-number check.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from hypothesis import strategies as st


MAX_BYTES = 4096
# Integers that break naive length/offset arithmetic, written over 8-byte fields by mutations.
BOUNDARIES = (0, 1, 7, 8, 255, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**64 - 1)
MUTATIONS = ("flip", "cut", "insert", "delete", "int64")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool)
ST_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X9", "", 7)
WIDTHS = (32, 64, 768, 1024, 0, -1, 2**40)  # tiny:sd1's attention widths, then real and absurd ones
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.", "text_encoder_2.",
                 "vae.", "")
LORA_MODULES = ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "mid_block.attentions.0.proj_in",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks_1_1_proj_in",
                "text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.1.self_attn.v_proj",
                "conv_in", "x", "")
LORA_PARAMS = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
               ".dora_scale", ".hada_w1_a", "")
META_KEYS = ("method", "ss_base_model_version", "ss_v2", "modelspec.architecture", "lora_adapter_metadata",
             "textual-inversion_token", "hypernetwork_a1111", "hypernetwork_widths", "format", "steps")
A1111_ENTRIES = ("layer_structure", "activation_func", "is_layer_norm", "use_dropout", "dropout_structure",
                 "last_layer_dropout", "activate_output", "weight_initialization", "name", "step")
PROMPT_PIECES = ("<lora:", "<hypernet:", "<lyco:", "<LoRA:", ">", ":", "(", ")", "[", "]", "\\", "BREAK", " ",
                 ",", "sks", "dog", "0.8", "-1", "1e308", "nan", "inf", ".", "1.2.3", "\n", "é", "\x00", "100.5",
                 "1e300")
# Numbers at and past every boundary an option has: huge, negative, non-finite, not whole, sub-normal.
EXTREME_NUMBERS = (0, -1, 1, 7, 8, 100, 1000, 1001, 4096, 4104, 2**63 - 1, 2**63, 2**64, 10**22, -(2**63), 0.5, 8.0,
                   -0.0, 5e-324, 1e300, float("nan"), float("inf"), float("-inf"), True)
# YAML texts: a config with anchors, an alias bomb and a recursive anchor, for mutation.
YAML_SEEDS = ("base: &b {steps: 3, lr: 1e-4}\ntrain: *b\ndata: {token: sks}\n",
              "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
                                                     for p, n in zip("abcdefgh", "bcdefghi")),
              "train: &t {x: *t}\n")


# Building blocks -------------------------------------------------------------------------------------------

def tensors() -> st.SearchStrategy:
    """Small tensors of any dtype and rank (0-3), sometimes empty."""
    shapes = st.lists(st.integers(0, 5), max_size=3)
    return st.builds(lambda shape, dtype, seed: _tensor(tuple(shape), dtype, seed), shapes,
                     st.sampled_from(DTYPES), st.integers(0, 2**16))


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    return values > 0 if dtype is torch.bool else values.to(dtype)


def plain_values() -> st.SearchStrategy:
    """JSON-like leaves and nests, the entries a pickle or header can carry."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=8)


def metadata() -> st.SearchStrategy:
    """A safetensors header's metadata: str -> str, from real keys and JSON-looking values."""
    values = st.one_of(st.text(max_size=20), plain_values().map(json.dumps), st.sampled_from(["sdxl", "sd1", "v2-"]))
    return st.dictionaries(st.one_of(st.sampled_from(META_KEYS), st.text(max_size=8)), values, max_size=4)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """Apply byte-level edits (positions wrap around the current length)."""
    out = bytearray(data)
    for op, pos, payload in edits:
        at = pos % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= (payload[:1] or b"\xff")[0] or 0x80
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = payload
        elif op == "delete":
            del out[at:at + 1 + len(payload)]
        elif op == "int64":
            value = BOUNDARIES[(payload[:1] or b"\0")[0] % len(BOUNDARIES)]
            out[at:at + 8] = struct.pack("<Q", value)
    return bytes(out[:MAX_BYTES * 4])


def mutated(seeds: list[bytes]) -> st.SearchStrategy:
    edit = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**16), st.binary(max_size=16))
    return st.builds(mutate, st.sampled_from(seeds), st.lists(edit, min_size=1, max_size=4))


# Valid files sdtune writes, as mutation seeds ----------------------------------------------------------------

def _seed_objects() -> list[tuple[dict, dict[str, str]]]:
    """(tensors or pickled object, header metadata) of each artifact kind in tiny:sd1's widths."""
    w = torch.arange(64, dtype=torch.float32).reshape(2, 32) / 64
    hn_side = {"linear.0.weight": torch.zeros(64, 32), "linear.0.bias": torch.zeros(64),
               "linear.1.weight": torch.zeros(32, 64), "linear.1.bias": torch.zeros(32)}
    a1111_hn = {32: (hn_side, dict(hn_side)), "layer_structure": [1, 2, 1], "activation_func": "relu",
                "is_layer_norm": False, "dropout_structure": [0, 0, 0], "name": "hn", "step": 3}
    kohya = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": w,
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": w.T.contiguous(),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(2.0)}
    return [
        (kohya, {"ss_base_model_version": "sd_v1"}),
        ({"sks": w}, {"method": "textual-inversion", "textual-inversion_token": "sks"}),
        ({"clip_l": w, "clip_g": w.clone()}, {}),
        ({"string_to_param": {"*": w}, "string_to_token": {"*": 265}, "name": "sks", "step": 1}, {}),
        (a1111_hn, {}),
    ]


def safetensors_seeds() -> list[bytes]:
    from safetensors.torch import save

    out = []
    for obj, meta in _seed_objects():
        flat = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if flat:
            out.append(save(flat, metadata=meta or None))
    return out


def pickle_seeds() -> list[bytes]:
    """torch.save zips and bare protocol-2 pickles of every seed object (A1111 files come in both)."""
    out = []
    for obj, _ in _seed_objects():
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out += [buffer.getvalue(), pickle.dumps(obj, protocol=2)]
    return out


def crafted_safetensors() -> st.SearchStrategy:
    """A header written by hand: any dtype/shape/offsets, a length prefix that may lie, any amount of data."""
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(ST_DTYPES),
                                   "shape": st.lists(st.sampled_from((0, 1, 3, 2**31, 2**62, -1)), max_size=3),
                                   "data_offsets": st.lists(st.sampled_from(BOUNDARIES + (4, 12)), min_size=0,
                                                            max_size=3)})
    header = st.dictionaries(st.one_of(st.just("__metadata__"), st.text(max_size=6)),
                             st.one_of(entry, metadata(), plain_values()), max_size=3)

    def build(h: dict, lie: int | None, data: bytes) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw) if lie is None else lie) + raw + data

    return st.builds(build, header, st.one_of(st.none(), st.sampled_from(BOUNDARIES)), st.binary(max_size=64))


def code_pickle(marker: Path) -> bytes:
    """A protocol-2 pickle that, if anything unpickled it unsafely, would create `marker`."""
    target = str(marker).encode()
    return (b"\x80\x02cbuiltins\nopen\nq\x00X" + struct.pack("<I", len(target)) + target
            + b"X\x01\x00\x00\x00w\x86R.")


# Small files that claim much: stride-0 views, shared-reference nests, deep nests; special files ------------

SPECIAL_NAMES = ("sks.safetensors", "dog.pt", "a.png", "a.txt", "x.bin", "checkpoints", "sub")


def saved(obj) -> bytes:
    """torch.save's bytes of `obj` (a torch zip)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_zip_with_pickle(data_pkl: bytes) -> bytes:
    """A torch zip as torch.save writes it, with data.pkl replaced by `data_pkl` (for pickles torch cannot write)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved([]))) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def laughs(levels: int) -> list:
    """A list whose two entries are the same list, `levels` deep: a few bytes pickled, 2**levels paths walked."""
    nest: list = []
    for _ in range(levels):
        nest = [nest, nest]
    return nest


def deep_pickle(levels: int) -> bytes:
    """`levels` nested lists as a protocol-2 pickle (torch.save would hit Python's recursion limit)."""
    return b"\x80\x02" + b"]" * levels + b"a" * (levels - 1) + b"."


def _stride0_artifact(layout: str, shape: list[int]) -> dict:
    """An artifact layout holding a view of 4 stored bytes that claims `shape`."""
    view = torch.zeros(1).expand(*shape)
    layer = TINY_LORA_LAYERS[0][0]
    return {"embedding": {"string_to_param": {"*": view}, "name": "fz"}, "single": {"fz": view},
            "lora": {f"{layer}.lora_down.weight": view, f"{layer}.lora_up.weight": torch.zeros(32, 1)},
            "hypernetwork": {32: ({"linear.0.weight": view, "linear.0.bias": torch.zeros(32)},) * 2,
                             "layer_structure": [1, 1]}}[layout]


def hostile_pickles() -> st.SearchStrategy:
    """Torch zips of a few KB that claim gigabytes or explode when walked, in the layouts generate reads."""
    shape = st.lists(st.sampled_from((1, 2, 32, 75, 76, 10**4, 10**6)), min_size=1, max_size=3)
    stride0 = st.builds(_stride0_artifact, st.sampled_from(("embedding", "single", "lora", "hypernetwork")), shape)
    return st.one_of(st.builds(saved, stride0), st.builds(lambda n: saved(laughs(n)), st.integers(1, 64)),
                     st.builds(lambda n: torch_zip_with_pickle(deep_pickle(n)), st.integers(1, 3000)))


def _hidden_fifo_link(path: Path, root: Path) -> None:
    fifo = path.with_name(f".{path.name}.fifo")
    os.mkfifo(fifo)
    path.symlink_to(fifo)


# How each special kind is made at a path (`root` is the tree's top folder).
SPECIAL_MAKERS = {
    "file": lambda path, root: path.write_bytes(b""),
    "fifo": lambda path, root: os.mkfifo(path),
    "hidden": lambda path, root: path.with_name(f".{path.stem}.1a2b3c4d.tmp{path.suffix}").write_bytes(b""),
    "folder": lambda path, root: path.mkdir(),
    "loop": lambda path, root: path.symlink_to(root),
    "link-to-fifo": _hidden_fifo_link,
    "broken-link": lambda path, root: path.symlink_to(root / "missing"),
}


def build_tree(root: Path, entries: list[tuple[str, str]]) -> None:
    """Make the drawn entries under `root`; a name already taken, or under a non-folder, is skipped (writing
    to an existing FIFO would block)."""
    root.mkdir(parents=True)
    for rel, kind in entries:
        path = root / rel
        try:
            if not os.path.lexists(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                SPECIAL_MAKERS[kind](path, root)
        except OSError:
            continue


def special_trees() -> st.SearchStrategy:
    """(relative path, kind) entries of a folder tree: regular files beside FIFOs, hidden temp files,
    symlink loops and links to FIFOs, all named like artifacts, images and captions."""
    path = st.lists(st.sampled_from(SPECIAL_NAMES), min_size=1, max_size=3).map(lambda parts: "/".join(parts))
    return st.lists(st.tuples(path, st.sampled_from(tuple(SPECIAL_MAKERS))), max_size=8)


# Structured artifacts (decoded without a file) -------------------------------------------------------------

# Layers of tiny:sd1 as (kohya or diffusers key prefix + name, lora_A shape after the rank, lora_B's first dim).
TINY_LORA_LAYERS = (
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (32,), 32),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", (32,), 64),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", (32, 1, 1), 32),
    ("lora_unet_down_blocks_0_resnets_0_conv1", (32, 3, 3), 32),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (32,), 32),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32,), 32),
    ("text_encoder.text_model.encoder.layers.1.self_attn.v_proj", (32,), 32),
)


def _lora_pair(layer: tuple, rank: int, wrong: tuple[int, int] | None, kohya_params: bool, alpha: bool) -> dict:
    """One layer's LoRA tensors: right shapes, or one dimension replaced by `wrong` = (which, size)."""
    name, a_rest, out = layer
    a_shape = [rank, *a_rest]
    b_shape = [out, rank] + [1, 1] * (len(a_rest) == 3)
    if wrong is not None:
        (a_shape if wrong[0] % 2 else b_shape)[wrong[0] % len(b_shape)] = wrong[1]
    down, up = (".lora_down.weight", ".lora_up.weight") if kohya_params else (".lora_A.weight", ".lora_B.weight")
    pair = {f"{name}{down}": torch.zeros(a_shape), f"{name}{up}": torch.zeros(b_shape)}
    return {**pair, f"{name}.alpha": torch.tensor(float(rank))} if alpha else pair


def lora_states() -> st.SearchStrategy:
    """LoRA tensors: layers of tiny:sd1 with right or wrong shapes, in either key style, plus loose keys."""
    wrong = st.one_of(st.none(), st.tuples(st.integers(0, 3), st.sampled_from((0, 1, 16, 768))))
    pair = st.builds(_lora_pair, st.sampled_from(TINY_LORA_LAYERS), st.sampled_from((1, 2, 4)), wrong,
                     st.booleans(), st.booleans())
    loose = st.dictionaries(st.builds(lambda a, b, c: a + b + c, st.sampled_from(LORA_PREFIXES),
                                      st.sampled_from(LORA_MODULES), st.sampled_from(LORA_PARAMS)), tensors(),
                            max_size=3)
    merged = st.builds(lambda pairs, extra: {k: v for d in [*pairs, extra] for k, v in d.items()},
                       st.lists(pair, min_size=1, max_size=3), st.one_of(st.just({}), loose))
    return st.tuples(merged, metadata())


def embedding_objects() -> st.SearchStrategy:
    """Embedding layouts (single key, clip_l/clip_g, A1111 string_to_param) with any tensors and entries."""
    fitting = st.builds(lambda n, w: torch.zeros(n, w), st.integers(1, 3), st.sampled_from((32, 32, 768, 1024, 1280)))
    vectors = st.one_of(fitting, tensors())  # tiny models are 32 wide
    a1111 = st.builds(lambda v, extra: {"string_to_param": {"*": v}, "name": "fz", **extra}, vectors,
                      st.dictionaries(st.sampled_from(("step", "sd_checkpoint", "sdtune", "string_to_token")),
                                      plain_values(), max_size=2))
    sdxl = st.builds(lambda a, b: {"clip_l": a, "clip_g": b}, vectors, vectors)
    single = st.dictionaries(st.sampled_from(("emb_params", "*", "fz", "<fz>", "")), vectors, min_size=1, max_size=2)
    return st.tuples(st.one_of(a1111, sdxl, single), metadata(), st.sampled_from(("sd1", "sdxl")))


def _coherent_hypernetwork(layers: tuple, activation: str, norm: bool, widths: list[int], drop: int | None) -> dict:
    """An A1111 dict whose tensors fit its entries (built by sdtune's own layer builder on the meta device),
    with one tensor removed when `drop` is given."""
    from .formats.hypernetwork import Structure
    from .hypernet_modules import HypernetworkNet

    structure = Structure(layers, activation, norm, "Normal", False, (0,) * len(layers))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HypernetworkNet(structure, widths).state_dict().items()}
    sides = {w: ({}, {}) for w in widths}
    for key, shape in shapes.items():
        width, side, name = key.split(".", 2)
        sides[int(width)][side == "v"][name] = torch.zeros(shape)
    if drop is not None and shapes:
        width, side, name = list(shapes)[drop % len(shapes)].split(".", 2)
        del sides[int(width)][side == "v"][name]
    return {**sides, "layer_structure": list(layers), "activation_func": activation, "is_layer_norm": norm,
            "dropout_structure": [0] * len(layers)}


def hypernetwork_objects() -> st.SearchStrategy:
    """A1111 hypernetwork dicts: coherent ones for tiny:sd1 (widths 32, 64), then the same with entries
    changed to any value, or loose width keys holding anything."""
    coherent = st.builds(_coherent_hypernetwork, st.sampled_from(((1, 2, 1), (1, 1, 1), (1, 0.5, 2, 1))),
                         st.sampled_from(("linear", "relu", "gelu", "tanh")), st.booleans(),
                         st.sampled_from(([32], [32, 64], [64], [768])), st.one_of(st.none(), st.integers(0, 50)))
    entry_values = st.one_of(plain_values(), st.lists(st.sampled_from((1, 2, 0.5, 0.0, 0.3, -1, 1e9)), max_size=4),
                             st.sampled_from(("relu", "linear", "softmax2d", "threshold", "Normal", "nosuch")))
    entries = st.dictionaries(st.sampled_from(A1111_ENTRIES), entry_values, max_size=3)
    loose = st.dictionaries(st.sampled_from(WIDTHS), st.one_of(st.tuples(st.just({}), st.just({})), plain_values(),
                                                               st.tuples(st.dictionaries(st.text(max_size=9), tensors(),
                                                                                         max_size=2))), max_size=2)
    return st.builds(lambda base, changed, extra: {**base, **changed, **extra}, coherent,
                     st.one_of(st.just({}), entries), st.one_of(st.just({}), loose))


def prompts() -> st.SearchStrategy:
    """Prompts assembled from A1111 syntax pieces, or any text."""
    pieces = st.lists(st.one_of(st.sampled_from(PROMPT_PIECES), st.text(max_size=4)), max_size=30).map("".join)
    return st.one_of(pieces, st.text(max_size=200))


def config_sections() -> st.SearchStrategy:
    """Config-file sections with real setting names and values of any type."""
    from .config import DataConfig, TrainConfig
    from .methods import registry

    names = [f.name for cls in (DataConfig, TrainConfig) for f in cls.__dataclass_fields__.values()]
    values = st.one_of(plain_values(), numbers(), st.sampled_from(("1e-4", "fp8", "1e22", "-inf", "12", " 7")))
    section = st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=5)), values, max_size=4)
    return st.one_of(st.dictionaries(st.sampled_from(("data", "train", *registry(), "x")),
                                     st.one_of(section, plain_values()), max_size=3), plain_values())


def numbers() -> st.SearchStrategy:
    """Boundary numbers first, then any integer or float."""
    return st.one_of(st.sampled_from(EXTREME_NUMBERS), st.integers(), st.floats())


def generate_options() -> st.SearchStrategy:
    """GenerateOptions with up to three bounded options drawn from `numbers()`, the rest left at defaults."""
    from .generate import LIMITS, GenerateOptions

    overrides = st.dictionaries(st.sampled_from(sorted(LIMITS)), numbers(), max_size=3)
    return overrides.map(lambda values: GenerateOptions(**values))


def yaml_texts() -> st.SearchStrategy:
    """Config file bytes: mutated YAML seeds (anchors, alias bombs) or any text."""
    return st.one_of(mutated([seed.encode() for seed in YAML_SEEDS]), st.text(max_size=200).map(str.encode))


def image_seeds() -> list[tuple[bytes, str]]:
    """(bytes, suffix) of valid images in every mode sdtune converts: RGB, 16-bit, palette, alpha, CMYK, WebP."""
    from PIL import Image

    images = [(Image.new("RGB", (9, 9), (200, 30, 30)), ".png"), (Image.new("I;16", (9, 9), 40000), ".png"),
              (Image.new("P", (9, 9), 3), ".png"), (Image.new("RGBA", (9, 9), (0, 0, 0, 0)), ".png"),
              (Image.new("CMYK", (9, 9), (0, 255, 0, 0)), ".jpg"), (Image.new("RGB", (9, 9)), ".webp")]
    out = []
    for image, suffix in images:
        buffer = io.BytesIO()
        image.save(buffer, format={".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[suffix])
        out.append((buffer.getvalue(), suffix))
    return out
