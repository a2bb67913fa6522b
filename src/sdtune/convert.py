"""`sdtune convert`: read an artifact in any layout, write it in another, bit-exact.

Every registered method that converts (`converts = True`) provides `recognises(obj, metadata) -> bool` and
`convert(obj, metadata, src, dst, to, model_spec) -> Path`; the first method that recognises the file
converts it, after the target layout and the output's extension are checked against the method's declared
layouts, so adding a method never touches this module. `--for CLIENT` picks (or, with --to, checks) the layout by
the client rules each layout declares (formats/clients.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .artifacts import flatten_tensors, load_artifact
from .errors import SdtuneError
from .formats.clients import CLIENTS, Verdict


def target_by_suffix(suffix: str) -> str | None:
    """The target layout an output extension implies, where only one layout is written with it (.pt: a1111)."""
    from .methods import layout_of, registry

    names = {name for cls in registry().values() if cls.converts for name in _targets(cls)
             if layout_of(cls, name).suffix == suffix.lower()}
    return names.pop() if len(names) == 1 else None


def convert_file(src: Path, dst: Path, to: str | None, model_spec: str | None = None, client: str | None = None,
                 report: Callable[[str], None] | None = None) -> Path:
    """Convert `src` into `dst` in layout `to`; without `to`, the layout that loads best in `client` (a
    formats.clients.CLIENTS key), else the one `dst`'s extension implies. With `client`, `report` hears how that
    client loads the result, and which layout would load better there."""
    from .methods import conversion_targets, layout_of, listing, registry

    to = to or (None if client else target_by_suffix(dst.suffix))
    if to is None and client is None:
        raise SdtuneError(f"Cannot tell the target layout from {dst.name}; pass --to "
                          f"{'|'.join(conversion_targets())} or --for a client.")
    if dst.resolve() == src.resolve():
        raise SdtuneError("Input and output are the same file; choose another output path.")
    obj, metadata = load_artifact(src)
    converters = [cls for cls in registry().values() if cls.converts]
    for method_cls in converters:
        if method_cls.recognises(obj, metadata):
            ranked = _ranked_for(method_cls, obj, metadata, client, dst.suffix) if client else []
            to = to or ranked[0][0]
            layout = layout_of(method_cls, to)
            if layout is None:
                raise SdtuneError(f"{method_cls.label} files convert to {', '.join(_targets(method_cls))}, "
                                  f"not {to}.")
            if dst.suffix.lower() != layout.suffix:
                raise SdtuneError(f"The {to} layout of {method_cls.label} files is a {layout.suffix} file; "
                                  f"name the output {dst.stem}{layout.suffix}.")
            written = method_cls.convert(obj, metadata, src, dst, to, model_spec)
            if ranked and report:
                for line in _advice(ranked, to):
                    report(line)
            return written
    kinds = listing([cls.label for cls in converters], "or")
    raise SdtuneError(f"{src.name} is not a {kinds} file that sdtune can convert.")


def _ranked_for(cls, obj, metadata: dict[str, str], client: str, suffix: str) -> list[tuple[str, Verdict]]:
    """The method's written file layouts with how `client` loads the file in each, best first; among equals the
    one `suffix` names, then the client's own (its rule has no exceptions), then declaration order."""
    from .formats.clients import verdict

    layers = cls.client_layers([(k, tuple(t.shape)) for k, t in flatten_tensors(obj).items()], metadata)
    found = [(lay, dict(lay.clients)[client]) for lay in cls.layouts
             if lay.written and lay.suffix != "/" and client in dict(lay.clients)]
    if not found:
        raise SdtuneError(f"sdtune knows no layout of {cls.label} files that {CLIENTS[client]} loads.")
    judged = [(lay, rule, verdict(client, rule, layers)) for lay, rule in found]
    judged.sort(key=lambda t: (-t[2].rank, t[0].suffix != suffix.lower(), len(t[1].exceptions)))
    return [(lay.name, v) for lay, _, v in judged]


def _advice(ranked: list[tuple[str, Verdict]], chosen: str) -> list[str]:
    """How the client loads the chosen layout, and the better layout when there is one."""
    verdict = dict(ranked).get(chosen)
    if verdict is None:  # a layout that declares no rule for this client
        return []
    lines = [f"{CLIENTS[verdict.client]} loads the {chosen} layout {verdict.level}"
             f"{': ' + verdict.detail if verdict.detail else ''}"]
    best, top = ranked[0]
    if top.rank > verdict.rank:
        lines.append(f"--to {best} loads {top.level} in {CLIENTS[verdict.client]}")
    return lines


def _targets(cls) -> tuple[str, ...]:
    from .formats import written_names

    return written_names(cls.layouts)
