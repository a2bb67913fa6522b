"""What `sdtune inspect FILE` prints: layout, tensors, bytes and the run card, read without loading the data
of a safetensors file, with every character that came from the file made printable."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .artifacts import SAFETENSORS_SUFFIX, check_readable, flatten_tensors, load_artifact
from .formats import Sniffed, sniff
from .methods import loads_in, registry
from .untrusted import ST_DTYPES, check_safetensors_header, unreadable


def _summary(path: Path) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """(name, dtype, shape) per tensor and metadata; a safetensors file's data is not read."""
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        obj, metadata = load_artifact(path)
        return [(k, t.dtype, tuple(t.shape)) for k, t in flatten_tensors(obj).items()], metadata
    check_readable(path)
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            slices = {k: f.get_slice(k) for k in f.keys()}
            rows = [(k, ST_DTYPES.get(s.get_dtype(), torch.uint8), tuple(s.get_shape())) for k, s in slices.items()]
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable(path, "safetensors", exc) from exc
    return rows, metadata


# Control characters but the newline, and bidi overrides: in a file's metadata they are terminal escape codes
# (recolour, retitle, rewrite earlier lines) or text shown in another order than it reads.
_UNPRINTABLE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, newlines: bool = True) -> str:
    """`text` with control characters written as visible escapes (\\x1b), newlines kept when `newlines`."""
    text = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
    return text if newlines else text.replace("\n", "\\n")


def _pretty(value: str, limit: int = 600) -> str:
    try:
        decoded = json.loads(value)
    except (json.JSONDecodeError, ValueError):
        decoded = value
    text = json.dumps(decoded, indent=2, sort_keys=True) if isinstance(decoded, (dict, list)) else str(decoded)
    text = text.replace("\n", "\n    ")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def artifact_sniff(path: str | os.PathLike) -> Sniffed:
    """What a file is: the layout `sdtune inspect` names and its method (a safetensors file's data is not read)."""
    rows, metadata = _summary(Path(path))
    return sniff([name for name, _, _ in rows], metadata)


def describe_artifact(path: str | os.PathLike) -> str:
    """What `sdtune inspect FILE` prints: layout, tensor count, parameters, bytes, dtypes, the run card and how
    each client (A1111, Forge, ComfyUI, kohya, diffusers) loads it."""
    path = Path(path)
    rows, metadata = _summary(path)
    numels = [torch.Size(shape).numel() for _, _, shape in rows]
    dtypes = Counter(str(dtype).removeprefix("torch.") for _, dtype, _ in rows)
    sniffed = sniff([name for name, _, _ in rows], metadata)
    method = registry().get(sniffed.method) if sniffed.method else None
    lines = [
        f"file:       {path}",
        f"format:     {sniffed.title}",
        *(method.inspect_lines([(name, shape) for name, _, shape in rows]) if method else []),
        f"tensors:    {len(rows)}",
        f"parameters: {sum(numels):,}",
        f"bytes:      {sum(n * d.itemsize for (_, d, _), n in zip(rows, numels)):,}",
        f"dtypes:     {', '.join(f'{d} x{n}' for d, n in dtypes.most_common()) or '-'}",
    ]
    if metadata:
        lines.append("metadata:")
        lines += [f"  {printable(key, newlines=False)}: {_pretty(value)}" for key, value in sorted(metadata.items())]
    found = loads_in(method, sniffed.layout, [(name, shape) for name, _, shape in rows], metadata) if method else []
    lines += ["loads in:", *(v.line() for v in found)] if found else ["loads in:   not known for this layout"]
    return printable("\n".join(lines))  # everything shown comes from the file
