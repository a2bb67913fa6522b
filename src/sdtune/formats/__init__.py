"""Pure dict-of-tensors <-> file-layout code, one module per artifact kind, plus format sniffing.

Each method declares its file layouts as `Layout` data (see sdtune.methods); `sniff` names a file's layout
from those declarations, then from the run card, then from the layouts of model files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """One file layout of a method's artifacts, as data: the name `--format` and `sdtune convert --to` take,
    the title `sdtune inspect` shows, the file it is written as, and how a file in it is recognised from its
    tensor names alone (a safetensors header is enough)."""

    name: str
    title: str
    suffix: str = ".safetensors"  # "/": a folder
    keys: str = ""  # a regular expression every tensor name of such a file matches in full ("": never sniffed)
    max_keys: int = 0  # the most tensors such a file holds (0: any number)
    written: bool = True  # False: a layout sdtune reads but never writes
    # How each client loads such a file: (client, formats.clients.Rule) pairs read from the clients' loaders
    clients: tuple = ()
    card_only: bool = False  # sniffed only when the run card names the method (the keys are no method's own)

    def holds(self, keys: Sequence[str]) -> bool:
        """Whether a file with these tensor names is in this layout."""
        if not self.keys or not keys or (self.max_keys and len(keys) > self.max_keys):
            return False
        pattern = re.compile(self.keys, re.DOTALL)
        return all(pattern.fullmatch(key) for key in keys)


def matching_layout(keys: Iterable[str], layouts: Iterable[Layout]) -> Layout | None:
    """The first of `layouts` a file with these tensor names is in (the order of a method's declaration)."""
    keys = list(keys)
    return next((layout for layout in layouts if layout.holds(keys)), None)


def written_names(layouts: Iterable[Layout]) -> tuple[str, ...]:
    """The names of the layouts sdtune writes, in order, each once."""
    return tuple(dict.fromkeys(layout.name for layout in layouts if layout.written))


@dataclass(frozen=True)
class Sniffed:
    """What a file is: a one-line title, and the method and layout when sdtune knows them."""

    title: str
    method: str | None = None
    layout: str | None = None


# Model files, which are no method's artifact: leading key fragment -> layout name (checked in order).
_MODEL_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "Stable Diffusion checkpoint (LDM single-file layout)"),
    ("conv_in.", "diffusers UNet weights"),
    ("down_blocks.", "diffusers UNet weights"),
    ("encoder.down.", "VAE weights (LDM layout)"),
    ("text_model.", "CLIP text encoder weights"),
)


def sniff(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> Sniffed:
    """What a flat tensor dict is, from its tensor names and run card: a method's layout (only the recorded
    method's layouts when the run card names one), else the run card's method, else a model file's layout."""
    from ..methods import registry

    keys = list(keys)
    methods = registry()
    recorded = (metadata or {}).get("method")
    for cls in [methods[recorded]] if recorded in methods else methods.values():
        layout = matching_layout(keys, [lay for lay in cls.layouts if recorded or not lay.card_only])
        if layout is not None:
            return Sniffed(layout.title, cls.name, layout.name)
    if recorded:
        return Sniffed(f"sdtune {recorded} artifact", recorded if recorded in methods else None)
    for fragment, title in _MODEL_LAYOUTS:
        if any(k.startswith(fragment) for k in keys):
            return Sniffed(title)
    return Sniffed("unknown layout")


def sniff_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """A one-line name of the layout a flat tensor dict is in, from its keys or its run card."""
    return sniff(keys, metadata).title
