"""Which generator loads a file, and how much of it: the clients users generate with, and how a layout's
declared rules turn a file's layers into a verdict per client (`sdtune inspect`, `sdtune convert --for`).

Each method's layouts declare, per client, a `Rule` read from that client's loading code: the client loads
nothing of such a file (and why), or it loads its layers except those a `Layer` pattern matches. A file's layers
are one-line descriptions its method writes (a LoRA layer: "<component> <group> <module> <algorithm> [flags]"; a
file applied whole: one line), so the rules are data and this module names no method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The clients, in the order `inspect` lists them: `--for` name -> the name users know.
CLIENTS: dict[str, str] = {
    "a1111": "AUTOMATIC1111",
    "forge": "Forge",
    "comfyui": "ComfyUI",
    "kohya": "kohya sd-scripts",
    "diffusers": "diffusers",
}
LEVELS = ("no", "partly", "fully")  # worst first: a verdict's rank is its index
# What a matching layer does to the verdict: left out or applied otherwise than trained (partly), the whole file
# refused (no), or loaded with a caveat worth saying (fully, with a note).
EFFECTS = ("drops", "misapplies", "refuses", "note")


@dataclass(frozen=True)
class Layers:
    """Layers of a file that a client treats otherwise than trained: those whose description `pattern` finds."""

    what: str  # a few words: "UNet attention layers (read only as processor.to_*)"
    pattern: str
    effect: str = "drops"

    def count(self, layers: Sequence[str]) -> int:
        found = re.compile(self.pattern)
        return sum(1 for layer in layers if found.search(layer))


@dataclass(frozen=True)
class Rule:
    """How one client loads a file of one layout: nothing (`refuses` says why and what to do) or its layers,
    less what `exceptions` match."""

    refuses: str = ""
    exceptions: tuple[Layers, ...] = ()


@dataclass(frozen=True)
class Verdict:
    client: str  # a key of CLIENTS
    level: str  # one of LEVELS
    detail: str = ""  # what is dropped or misapplied, why not, or a caveat

    @property
    def rank(self) -> int:
        return LEVELS.index(self.level)

    def line(self) -> str:
        return f"  {CLIENTS[self.client] + ':':<18}{self.level}{': ' + self.detail if self.detail else ''}"


FULLY = Rule()


def verdict(client: str, rule: Rule, layers: Sequence[str]) -> Verdict:
    """What `rule` makes of a file with these layer descriptions in `client`."""
    if rule.refuses:
        return Verdict(client, "no", rule.refuses)
    counts = [(part, part.count(layers)) for part in rule.exceptions]
    refused = [part.what for part, n in counts if n and part.effect == "refuses"]
    if refused:
        return Verdict(client, "no", "; ".join(refused))
    dropped = {i for part in rule.exceptions if part.effect == "drops"
               for i, layer in enumerate(layers) if re.search(part.pattern, layer)}
    if layers and len(dropped) == len(layers):
        return Verdict(client, "no", "; ".join(p.what for p, n in counts if n and p.effect == "drops"))
    partial = [f"{p.what} x{n}" for p, n in counts if n and p.effect in ("drops", "misapplies")]
    notes = [p.what for p, n in counts if n and p.effect == "note"]
    return Verdict(client, "partly" if partial else "fully", "; ".join(partial + notes))


def verdicts(rules: Iterable[tuple[str, Rule]], layers: Sequence[str]) -> list[Verdict]:
    """A verdict per client in CLIENTS order; a client a layout declares no rule for is not known to load it."""
    declared = dict(rules)
    return [verdict(c, declared[c], layers) if c in declared else Verdict(c, "no", "not known to load this layout")
            for c in CLIENTS]
