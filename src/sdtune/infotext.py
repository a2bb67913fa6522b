"""The "parameters" text AUTOMATIC1111 writes into its images, for the images `sdtune generate` makes.

A1111's PNG Info, civitai and ComfyUI read it: the prompt as typed (<lora:...>/<hypernet:...> tags and
embedding words kept), a "Negative prompt:" line, then one line of "Key: value" pairs in A1111's order
(modules/processing.py create_infotext); a value holding ',', ':' or a newline is JSON-quoted as
infotext_utils.quote does. Resources are named with A1111's short hashes: "Model hash" is the first 10 hex
of the checkpoint file's sha256, "TI hashes" the first 12 of each embedding file's, "Lora hashes" the first
12 of each LoRA's tensor bytes (kohya's "addnet" hash of a .safetensors, the whole file's otherwise).
A model that is no single file (a diffusers folder, builtin, tiny:*) has no A1111 hash; its "Model hash" is
the first 10 hex of sdtune's fingerprint of its weights, the `base_hash` its artifacts' run cards record.

PNG keeps the text in a "parameters" text chunk, JPEG and WebP in the EXIF UserComment (UTF-16, as A1111's
piexif writes it); other formats get none.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import file_hash
from .model import SINGLE_FILE_SUFFIXES

PNG_KEY = "parameters"
EXIF_IFD = 0x8769  # the EXIF sub-IFD, where UserComment lives
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"  # EXIF's character-code marker for UTF-16 text (big-endian, as piexif writes)
EXIF_FORMATS = ("JPEG", "WEBP")
TIFF_LONG, TIFF_UNDEFINED = 4, 7  # TIFF field types
IFD_BYTES = 2 + 12 + 4  # an IFD of one entry: count, the entry, the next IFD's offset
MODEL_HASH_CHARS = 10  # A1111's checkpoint short hash
ARTIFACT_HASH_CHARS = 12  # A1111's embedding and LoRA short hash
# Characters A1111 drops from a resource name inside a hash list (they would split it).
NAME_UNSAFE = str.maketrans("", "", ":,")


@dataclass(frozen=True)
class Applied:
    """One artifact a prompt activated: its method, its kind as the prompt named it ("lora", "hypernet",
    "embedding"), the name the prompt used, its weight and its file."""

    method: type
    kind: str
    name: str
    weight: float
    path: Path

    def report(self, detail: str = "") -> str:
        """The line `generate` prints for it: what, how strong, from which file."""
        return f"using {self.kind} {self.name} ({detail or f'weight {self.weight:g}'}) from {self.path}"


@dataclass
class Infotext:
    """What a generation was: everything A1111's infotext holds that sdtune knows."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float | None
    seed: int
    model_hash: str
    model_name: str
    schedule_type: str | None = None
    clip_skip: int = 1
    applied: list[Applied] = field(default_factory=list)

    def text(self, size: tuple[int, int], position: int = 0, count: int = 1) -> str:
        """The text for one image of `size` (width, height), image `position` of `count` drawn together."""
        fields: dict[str, object] = {
            "Steps": self.steps, "Sampler": self.sampler, "Schedule type": self.schedule_type,
            "CFG scale": None if self.cfg_scale is None else float(self.cfg_scale), "Seed": self.seed,
            "Size": f"{size[0]}x{size[1]}",
            "Model hash": self.model_hash, "Model": self.model_name,
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None,
            # sdtune draws every image of one -n from one generator: the batch says how to get this one again
            "Batch size": count if count > 1 else None, "Batch pos": position if count > 1 else None,
        }
        for key in dict.fromkeys(a.method.a1111_hash_field for a in self.applied if a.method.a1111_hash_field):
            hashes = {a.name.translate(NAME_UNSAFE): artifact_hash(a) for a in self.applied
                      if a.method.a1111_hash_field == key}
            fields[key] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items()) or None
        return compose(self.prompt, self.negative_prompt, fields)


def compose(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """A1111's layout: prompt, "Negative prompt: ..." when there is one, the "Key: value, ..." line."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def model_identity(model) -> tuple[str, str]:
    """(hash, name) of the base model as the infotext names it; a checkpoint file's hash is computed once
    per loaded model (reading gigabytes)."""
    source = Path(model.source)
    if source.suffix.lower() in SINGLE_FILE_SUFFIXES and source.is_file():
        if "a1111_hash" not in model.extras:
            model.extras["a1111_hash"] = file_hash(source)[:MODEL_HASH_CHARS]
        return model.extras["a1111_hash"], source.stem
    label = source.name if source.is_dir() else model.source
    return model.fingerprint()[:MODEL_HASH_CHARS], label


def artifact_hash(applied: Applied) -> str:
    """A1111's short hash of a LoRA or embedding file."""
    path = applied.path
    if applied.method.a1111_hash == "tensors" and path.suffix.lower() == ".safetensors":
        return _tensor_bytes_hash(path)[:ARTIFACT_HASH_CHARS]
    return file_hash(path)[:ARTIFACT_HASH_CHARS]


def _tensor_bytes_hash(path: Path) -> str:
    """sha256 of a .safetensors file's tensor bytes, after its header (kohya's "addnet" hash): editing the
    metadata leaves it unchanged."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def exif_user_comment(text: str) -> bytes:
    """EXIF holding only `text` as UserComment, typed UNDEFINED as piexif (A1111's reader) expects: PIL
    would type the bytes BYTE, which piexif hands back as a tuple of ints. Little-endian TIFF: header, IFD0
    with one entry (the EXIF IFD's offset), the EXIF IFD with one entry, then the comment's bytes."""
    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    exif_ifd = 8 + IFD_BYTES
    data = exif_ifd + IFD_BYTES
    tiff = (b"II*\x00" + struct.pack("<I", 8)
            + struct.pack("<HHHII I", 1, EXIF_IFD, TIFF_LONG, 1, exif_ifd, 0)
            + struct.pack("<HHHII I", 1, USER_COMMENT, TIFF_UNDEFINED, len(comment), data, 0)
            + comment)
    return b"Exif\x00\x00" + tiff


def save_image(image, path: Path) -> None:
    """Save `image` at `path` (format from the suffix) with its "parameters" text where the format has room
    for it: a PNG text chunk, or the EXIF UserComment of a JPEG or WebP."""
    from PIL import Image, PngImagePlugin

    text = image.info.get(PNG_KEY)
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    if not text:
        image.save(path)
    elif image_format == "PNG":
        chunk = PngImagePlugin.PngInfo()
        chunk.add_text(PNG_KEY, text)
        image.save(path, pnginfo=chunk)
    elif image_format in EXIF_FORMATS:
        image.save(path, exif=exif_user_comment(text))
    else:
        image.save(path)
