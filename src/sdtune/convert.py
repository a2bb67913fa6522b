"""`sdtune convert`: read an artifact in any layout, write it in another, bit-exact.

Every registered method that converts (`converts = True`) provides `recognises(obj, metadata) -> bool` and
`convert(obj, metadata, src, dst, to, model_spec) -> Path`; the first method that recognises the file
converts it, after the target layout and the output's extension are checked against the method's declared
layouts, so adding a method never touches this module.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import load_artifact
from .errors import SdtuneError


def target_by_suffix(suffix: str) -> str | None:
    """The target layout an output extension implies, where only one layout is written with it (.pt: a1111)."""
    from .methods import layout_of, registry

    names = {name for cls in registry().values() if cls.converts for name in _targets(cls)
             if layout_of(cls, name).suffix == suffix.lower()}
    return names.pop() if len(names) == 1 else None


def convert_file(src: Path, dst: Path, to: str | None, model_spec: str | None = None) -> Path:
    from .methods import conversion_targets, layout_of, listing, registry

    to = to or target_by_suffix(dst.suffix)
    if to is None:
        raise SdtuneError(f"Cannot tell the target layout from {dst.name}; pass --to "
                          f"{'|'.join(conversion_targets())}.")
    if dst.resolve() == src.resolve():
        raise SdtuneError("Input and output are the same file; choose another output path.")
    obj, metadata = load_artifact(src)
    converters = [cls for cls in registry().values() if cls.converts]
    for method_cls in converters:
        if method_cls.recognises(obj, metadata):
            layout = layout_of(method_cls, to)
            if layout is None:
                raise SdtuneError(f"{method_cls.label} files convert to {', '.join(_targets(method_cls))}, "
                                  f"not {to}.")
            if dst.suffix.lower() != layout.suffix:
                raise SdtuneError(f"The {to} layout of {method_cls.label} files is a {layout.suffix} file; "
                                  f"name the output {dst.stem}{layout.suffix}.")
            return method_cls.convert(obj, metadata, src, dst, to, model_spec)
    kinds = listing([cls.label for cls in converters], "or")
    raise SdtuneError(f"{src.name} is not a {kinds} file that sdtune can convert.")


def _targets(cls) -> tuple[str, ...]:
    from .formats import written_names

    return written_names(cls.layouts)
