"""`sdtune convert`: read an artifact in any layout, write it in another, bit-exact.

Each method class that owns a file kind provides `recognises(obj, metadata) -> bool` and
`convert(obj, metadata, src, dst, to, model_spec) -> Path`; the first method that recognises the file
converts it, so adding a method never touches this module.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import load_artifact
from .errors import SdtuneError

# Target layout inferred from OUT's extension where only one layout uses it.
TARGET_BY_SUFFIX = {".pt": "a1111"}


def convert_file(src: Path, dst: Path, to: str | None, model_spec: str | None = None) -> Path:
    from .methods import registry

    to = to or TARGET_BY_SUFFIX.get(dst.suffix.lower())
    if to is None:
        raise SdtuneError(f"Cannot tell the target layout from {dst.name}; pass --to sdtune|diffusers|kohya|a1111.")
    if dst.resolve() == src.resolve():
        raise SdtuneError("Input and output are the same file; choose another output path.")
    obj, metadata = load_artifact(src)
    for method_cls in registry().values():
        if hasattr(method_cls, "recognises") and method_cls.recognises(obj, metadata):
            return method_cls.convert(obj, metadata, src, dst, to, model_spec)
    raise SdtuneError(f"{src.name} is not a LoRA, embedding or hypernetwork file that sdtune can convert.")
