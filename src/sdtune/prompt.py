"""A1111-style prompt syntax: extra-network tags (<lora:NAME:W>, <hypernet:NAME:W>) and attention emphasis.

Tags name artifacts found in artifact folders and are stripped from the text before it reaches the text encoder;
`parse_emphasis` turns "(word:1.3) [word]" into (text, weight) fragments the way A1111's `parse_prompt_attention`
does, so prompts copied from the web UI mean the same thing here.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sdtune.errors import SdtuneError
from sdtune.scan import regular_files

_WEIGHT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
MAX_TAG_WEIGHT = 100.0  # A1111 users write 0..2; beyond 100 an artifact only breaks the image

BREAK = "BREAK"
"""Text of the marker fragment `parse_emphasis` emits for the BREAK keyword (its weight is `BREAK_WEIGHT`)."""
BREAK_WEIGHT = -1.0

_ROUND = 1.1
_SQUARE = 1 / 1.1
# Token grammar of A1111's attention parser: escapes, a lone backslash, openers, "(…:W)" closer, closers,
# plain text runs and a lone colon.
_ATTENTION_RE = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\ |
    \( | \[ |
    :\s*([+-]?[.\d]+)\s*\) |
    \) | \] |
    [^\\()\[\]:]+ |
    :
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class ArtifactTag:
    """One `<kind:name:weight>` tag found in a prompt; `kind` is the method's own tag (an alias such as `lyco`
    becomes it), `text` is the tag as written (for messages)."""

    kind: str
    name: str
    weight: float = 1.0
    text: str = ""


def _tags() -> dict[str, str]:
    """Every tag a prompt may write (lower case) -> the method's own tag: the registered methods' tags and
    aliases (`lyco` is `lora`'s, as in A1111's built-in Lora extension)."""
    from .methods import by_prompt_tag

    return {tag: cls.prompt_tag for tag, cls in by_prompt_tag().items()}


def _tag_pattern(tags: dict[str, str]) -> re.Pattern[str]:
    return re.compile(rf"<({'|'.join(map(re.escape, tags)) or '(?!)'}):([^>]*)>", re.IGNORECASE)


def _parse_tag(match: re.Match[str], tags: dict[str, str]) -> ArtifactTag:
    """Turn one regex match into an ArtifactTag, refusing empty names and non-numeric weights."""
    raw, kind, body = match.group(0), match.group(1).lower(), match.group(2)
    fields = [f.strip() for f in body.split(":")]
    name = fields[0]
    if not name:
        raise SdtuneError(f"prompt tag {raw} has no name: write it as <{kind}:NAME> or <{kind}:NAME:WEIGHT>.")
    if len(fields) > 2:
        raise SdtuneError(
            f"prompt tag {raw} has more than one weight: write it as <{kind}:NAME:WEIGHT> with a single number."
        )
    weight = 1.0
    if len(fields) == 2:
        if not _WEIGHT_RE.fullmatch(fields[1]):
            raise SdtuneError(
                f"prompt tag {raw} has weight {fields[1]!r}, which is not a number: use e.g. <{kind}:{name}:0.8>."
            )
        weight = float(fields[1])
        if not (math.isfinite(weight) and abs(weight) <= MAX_TAG_WEIGHT):
            raise SdtuneError(f"prompt tag {raw} has weight {fields[1]}, outside -{MAX_TAG_WEIGHT:g} to "
                              f"{MAX_TAG_WEIGHT:g} (larger weights overflow into NaN images): use e.g. 0.8.")
    return ArtifactTag(kind=tags[kind], name=name, weight=weight, text=raw)


def _is_blank(segment: str) -> bool:
    """True for text between tags that holds only separators (spaces, commas)."""
    return segment.strip(" \t\r\n,") == ""


def _join(left: str, right: str) -> str:
    """Join the text on both sides of a removed tag, collapsing the doubled space or comma it leaves."""
    lhs, rhs = left.rstrip(), right.lstrip()
    spaced = lhs != left or rhs != right
    if lhs.endswith(",") and rhs.startswith(","):
        rhs, spaced = rhs[1:].lstrip(), True
    if not lhs or not rhs:
        return lhs + rhs
    if rhs[0] in ",.;:!?)]":
        return lhs + rhs
    return lhs + (" " if spaced else "") + rhs


def parse_artifact_tags(prompt: str) -> tuple[str, list[ArtifactTag]]:
    """Strip the registered methods' tags from a prompt: <lora:NAME:W>, <lyco:NAME:W> (alias of lora),
    <hypernet:NAME:W>.

    Returns the cleaned text and the tags in order of appearance. A prompt without tags is returned unchanged;
    other `<...>` text is left alone. Names may hold spaces, dashes and dots but not ':' or '>'.
    """
    known = _tags()
    matches = list(_tag_pattern(known).finditer(prompt))
    if not matches:
        return prompt, []
    tags = [_parse_tag(m, known) for m in matches]
    segments, start = [], 0
    for m in matches:
        segments.append(prompt[start : m.start()])
        start = m.end()
    segments.append(prompt[start:])

    lead_blank, tail_blank = _is_blank(segments[0]), _is_blank(segments[-1])
    kept = [s for s in segments if not _is_blank(s)]
    if not kept:
        return "", tags
    text = kept[0]
    for seg in kept[1:]:
        text = _join(text, seg)
    if lead_blank:
        text = text.lstrip(" \t\r\n,")
    if tail_blank:
        text = text.rstrip(" \t\r\n,")
    return text, tags


# Folders never searched for artifacts (besides hidden ones such as .venv, .git): caches and training checkpoints.
SKIPPED_FOLDERS = {"__pycache__", "checkpoints", "site-packages", "node_modules"}


def artifact_candidates(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Artifact files under a folder (recursively, as A1111 scans its model folders), shallowest first; only
    regular files with visible names (no FIFOs, no temp files of interrupted writes), see sdtune.scan."""
    return regular_files(folder, suffixes, skip_dir=SKIPPED_FOLDERS.__contains__)


def resolve_artifact(
    tag: ArtifactTag,
    artifact_dirs: Sequence[Path | str],
    suffixes: Sequence[str] = (".safetensors", ".pt", ".ckpt", ".bin"),
) -> Path:
    """Find the file a tag names: exact stem match, earlier folders win, then the earlier suffix (.safetensors).

    Raises SdtuneError listing the folders searched and suggesting close names when nothing matches.
    """
    order = {s.lower(): i for i, s in enumerate(suffixes)}
    all_stems: list[str] = []
    for folder in map(Path, artifact_dirs):
        if not folder.is_dir():
            continue
        files = artifact_candidates(folder, suffixes)
        hits = [p for p in files if p.stem == tag.name]
        if hits:
            return min(hits, key=lambda p: order[p.suffix.lower()])
        all_stems.extend(p.stem for p in files)
    searched = ", ".join(str(d) for d in artifact_dirs) or "(no folders given)"
    close = difflib.get_close_matches(tag.name, sorted(set(all_stems)), n=3, cutoff=0.6)
    if not close:
        close = sorted({s for s in all_stems if s.lower() == tag.name.lower()})
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    exts = "/".join(suffixes)
    raise SdtuneError(
        f"{tag.kind} '{tag.name}' from {tag.text or 'the prompt'} was not found as a {exts} file in: {searched}"
        f"{hint} (add the file or fix the name)."
    )


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments using A1111's attention syntax.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.5)` multiplies by 1.5, nesting multiplies,
    `\\( \\) \\[ \\] \\\\` are literal characters, unmatched closers are literal text and brackets still open at
    the end apply to everything after them (as A1111 does). `BREAK` becomes its own ("BREAK", -1.0) fragment.
    Adjacent fragments of equal weight are merged; empty input gives [("", 1.0)].
    Differences from A1111, on purpose: the BREAK marker keeps weight -1.0 even inside brackets, empty
    fragments are dropped, and an unparseable weight such as "(x:1.2.3)" is kept as literal text instead of
    crashing.
    """
    res: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(chunk)):
            if i > 0:
                res.append([BREAK, BREAK_WEIGHT, True])
            if part:
                res.append([part, 1.0, False])

    for m in _ATTENTION_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            # An escape gives its character; a lone backslash yields nothing, matching A1111.
            if tok[1:]:
                res.append([tok[1:], 1.0, False])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_float(weight):
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            add_text(tok)

    for pos in round_open:
        multiply(pos, _ROUND)
    for pos in square_open:
        multiply(pos, _SQUARE)

    merged: list[list] = []
    for item in res:
        if merged and not item[2] and not merged[-1][2] and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    if not merged:
        return [("", 1.0)]
    return [(t, w) for t, w, _ in merged]


def _is_float(s: str) -> bool:
    """True when A1111's weight capture (digits and dots) is a real number."""
    try:
        float(s)
    except ValueError:
        return False
    return True
