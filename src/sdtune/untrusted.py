"""Reading tensor files from strangers: a pickle's structure is bounded before it is unpickled, a safetensors
header's claims are checked against the file's size before any data is read, and every loaded tensor must
hold the bytes its shape claims (no stride-0 or overlapping views that expand into gigabytes on first use).

`torch.load(weights_only=True)` stops code, not size: a 2 KB pickle can nest shared references 64 deep
(2**64 paths for any walker), nest lists until Python's recursion limit, or rebuild a 4-byte storage as a
tensor of any shape. Everything here refuses such files in one sentence, before memory is spent on them.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import SdtuneError

MAX_PICKLE_BYTES = 64 << 20  # a full SDXL checkpoint's data.pkl is well under 2 MB
MAX_PICKLE_OPS = 5_000_000  # ~40 opcodes per tensor: a training checkpoint with optimizer state is < 1 M
MAX_DEPTH = 100  # real artifacts nest < 12 levels; Python walkers recurse ~1000 deep before failing
MAX_NODES = 1_000_000  # objects reached when shared references are followed each time (real files: < 100 k)
LEGACY_PICKLES = 5  # torch's pre-zip format: magic, protocol, sys info, the object, storage keys; then raw data
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
# Opcodes that add to the container below them on the stack (it stays the same object, shared via the memo).
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_MARK = object()

# safetensors header dtype codes -> torch dtypes (for sizes and uniform names).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def unreadable(path: Path, kind: str, exc: BaseException | str) -> SdtuneError:
    """The refusal of a damaged file, with the reader's reason on the same line."""
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return SdtuneError(f"{path} is not a readable {kind} file (truncated or corrupt: {reason}); "
                       "download or export it again.")


def _too_large(where: str, why: str) -> SdtuneError:
    return SdtuneError(f"{where} {why}, more than any artifact holds, and was not loaded; "
                       "convert it to .safetensors with a tool you trust.")


class _Node:
    """What the opcode scan knows of one object: how deep it nests and how many objects it expands to."""

    __slots__ = ("depth", "size")

    def __init__(self, parts: list[_Node]) -> None:
        self.depth = 1 + max((p.depth for p in parts), default=-1)
        self.size = 1 + sum(p.size for p in parts)

    def absorb(self, parts: list[_Node]) -> None:
        self.depth = max([self.depth, *(p.depth + 1 for p in parts)])
        self.size += sum(p.size for p in parts)


def _pop(stack: list, before: list) -> list[_Node]:
    """Pop what an opcode consumes (a mark and the items above it count as one slice); deepest first."""
    popped: list[_Node] = []
    for kind in reversed(before):
        if kind is pickletools.markobject:
            continue  # consumed with its stackslice
        if kind is pickletools.stackslice:
            while (item := stack.pop()) is not _MARK:
                popped.append(item)
        else:
            item = stack.pop()
            if item is _MARK:
                raise ValueError("a mark where an object was expected")
            popped.append(item)
    return popped[::-1]


def _scan_ops(stream: BinaryIO, where: str) -> None:
    """Walk one pickle's opcodes (nothing is built), refusing too many ops, deep nests and shared-reference
    explosions; damaged opcodes raise ValueError, IndexError or KeyError."""
    stack: list = []
    memo: dict[int, _Node] = {}
    for count, (op, arg, _) in enumerate(pickletools.genops(stream)):
        if count > MAX_PICKLE_OPS:
            raise _too_large(where, f"has over {MAX_PICKLE_OPS:,} pickle operations")
        name = op.name
        if name in _PUTS:
            memo[len(memo) if arg is None else arg] = stack[-1]
        elif name in _GETS:
            stack.append(memo[arg])
        elif name == "MARK":
            stack.append(_MARK)
        elif name != "STOP":
            parts = _pop(stack, op.stack_before)
            if not op.stack_after:  # POP, POP_MARK, PROTO, FRAME: nothing is built
                continue
            if name in _MUTATORS:
                node = parts[0]
                node.absorb(parts[1:])
            else:
                node = _Node(parts)
            if node.depth > MAX_DEPTH:
                raise _too_large(where, f"nests its entries over {MAX_DEPTH} levels deep")
            if node.size > MAX_NODES:
                raise _too_large(where, f"expands to over {MAX_NODES:,} entries (shared references repeated)")
            stack += [node] * len(op.stack_after)


def _zip_pickles(path: Path, archive: zipfile.ZipFile) -> list[bytes]:
    """The data.pkl records of a torch zip, refused when records claim more bytes than the file has."""
    infos = archive.infolist()
    if sum(i.file_size for i in infos) > path.stat().st_size:
        raise unreadable(path, "torch", "its records claim more bytes than the file holds")
    pickles = [i for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
    if any(i.file_size > MAX_PICKLE_BYTES for i in pickles):
        raise _too_large(str(path), f"has a pickle over {MAX_PICKLE_BYTES >> 20} MB")
    return [archive.read(i) for i in pickles]


def check_pickle(path: Path) -> None:
    """Bound the structure of a .pt/.ckpt/.bin (torch zip or legacy pickle) before it is unpickled."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for data in _zip_pickles(path, archive):
                    _scan_ops(io.BytesIO(data), str(path))
            return
        with open(path, "rb") as f:  # in memory: a length field then reads what is there, not what it claims
            data = f.read(MAX_PICKLE_BYTES)
        head = io.BytesIO(data)
        for _ in range(LEGACY_PICKLES):
            if head.tell() >= len(data):
                break
            _scan_ops(head, str(path))
    except SdtuneError:
        raise
    except (ValueError, IndexError, KeyError, EOFError, zipfile.BadZipFile, RuntimeError, OSError) as exc:
        raise unreadable(path, "torch", exc) from exc


def check_safetensors_header(path: Path) -> None:
    """Refuse a header longer than the file, or one that claims a tensor bigger than the file, unread."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} exceeds the file's {size} bytes")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise unreadable(path, "safetensors", exc) from exc
    entries = header.items() if isinstance(header, dict) else ()
    for key, entry in entries:
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        shape, dtype = entry.get("shape"), ST_DTYPES.get(entry.get("dtype"))
        if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            continue  # the safetensors reader refuses these with its own reason
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > size - 8 - length:
            raise unreadable(path, "safetensors", f"tensor {key!r} claims {claimed:,} bytes of shape {shape} but "
                                                  f"the file holds {size - 8 - length:,} bytes of data")


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) of a nested dict/list/tuple in order, refusing nests deeper than MAX_DEPTH or
    over MAX_NODES entries (a shared reference counts each time it is reached, so cycles are refused too)."""
    todo: list[tuple[Any, str, int]] = [(obj, prefix, 0)]
    for _ in range(MAX_NODES + 1):
        if not todo:
            return
        item, key, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise _too_large("An artifact", f"nests its entries over {MAX_DEPTH} levels deep")
        if isinstance(item, torch.Tensor):
            yield key.rstrip("."), item
            continue
        children = item.items() if isinstance(item, Mapping) else enumerate(item) if isinstance(
            item, (list, tuple)) else ()
        todo += reversed([(value, f"{key}{name}.", depth + 1) for name, value in children])
    raise _too_large("An artifact", f"expands to over {MAX_NODES:,} entries (shared references repeated)")


def check_tensor(path: Path, key: str, t: torch.Tensor) -> None:
    """Refuse a tensor that is not a plain strided one holding every element it claims in its own storage."""
    name = repr(key) if key else "(the top-level object)"
    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
        raise SdtuneError(f"{path} holds tensor {name} of layout {t.layout}, not a dense tensor, and was not "
                          "loaded; convert it to .safetensors with a tool you trust.")
    if t.numel() == 0:
        return
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    needed = max(t.numel(), t.storage_offset() + extent) * t.element_size()
    repeated = any(s == 0 for n, s in zip(t.shape, t.stride()) if n > 1)
    if repeated or needed > t.untyped_storage().nbytes():
        raise SdtuneError(f"{path} holds tensor {name} of shape {list(t.shape)} that repeats or overlaps its "
                          f"{t.untyped_storage().nbytes():,} stored bytes (a view, not data) and was not loaded; "
                          "export it again from the tool that made it.")


def check_tensors(path: Path, obj: Any) -> None:
    """Every tensor of a loaded file passes `check_tensor` (the walk itself is bounded)."""
    for key, t in iter_tensors(obj):
        check_tensor(path, key, t)
