"""Every file sdtune writes or reads: atomic safetensors with a run card, safe pickle loading and hashes
(what `sdtune inspect FILE` prints is in inspection.py)."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as st

from . import __version__
from .errors import SdtuneError
from .untrusted import check_pickle, check_safetensors_header, check_tensors, iter_tensors, unreadable

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# errno -> what to tell the user about a failed write.
_WRITE_ERRORS: dict[int, str] = {
    errno.ENOSPC: "the disk is full; free some space and run again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run again",
    errno.ENOTDIR: "a part of the folder path is a file, not a folder; choose another output path",
    errno.EEXIST: "a part of the folder path is a file, not a folder; choose another output path",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another output path",
    errno.EISDIR: "a folder is already there; choose a file name",
}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def _write_error(path: Path, exc: BaseException) -> SdtuneError:
    """A one-sentence error for a failed write of `path`."""
    code = getattr(exc, "errno", None)
    if code is None:
        match = _RUST_OS_ERROR.search(str(exc))
        code = int(match.group(1)) if match else None
    reason = _WRITE_ERRORS.get(code, f"{exc}") if code is not None else f"{exc}"
    return SdtuneError(f"Could not write {path}: {reason}.")


def run_card(**fields: Any) -> dict[str, str]:
    """Metadata for an artifact header: strings kept, everything else JSON-encoded; adds the sdtune version."""
    fields.setdefault("sdtune_version", __version__)
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str (bad key {bad[0]!r}); build it with run_card().")
    return meta


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU-agnostic tensors; copies where several share one storage (safetensors refuses that)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"artifact entry {key!r} is a {type(value).__name__}, not a tensor.")
        t = value.detach().contiguous()
        ptr = (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file (or, best effort, a folder entry) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def refuse_special(path: Path) -> None:
    """Refuse a target that exists but is no regular file (a device such as /dev/full, a pipe, a folder, a
    dangling link): the rename that ends an atomic write would replace it, e.g. a device node, as root."""
    if os.path.lexists(path) and not path.is_file():
        raise SdtuneError(f"Could not write {path}: something other than a regular file (a device, pipe, folder "
                          "or broken link) is there; choose another output path.")


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, so a renamed folder never holds empty files after a crash."""
    for entry in sorted(folder.rglob("*")):
        _fsync(entry, directory=entry.is_dir())
    _fsync(folder, directory=True)


def temp_sibling(path: Path, folder: bool = False) -> Path:
    """A new hidden sibling of `path` to fill before a rename: `.NAME.<random>.tmp` plus NAME's suffix (image
    writers pick the format from it). Created with the umask's mode (mkstemp's 0600 would leave artifacts
    unreadable to the group where the user's other files are not)."""
    suffix = "" if folder else path.suffix
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise SdtuneError(f"Could not create a temporary file beside {path}; clear hidden .tmp files there.")


def stale_temps(path: Path) -> list[Path]:
    """Hidden leftovers of writes of `path` that a killed process never renamed or removed."""
    return [p for pattern in (f".{glob.escape(path.name)}.*.tmp*", f".{glob.escape(path.name)}.*.old")
            for p in path.parent.glob(pattern)]


def save_artifact(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors + metadata as .safetensors atomically: a temp file beside `path`, fsync, rename.
    On any failure nothing appears at `path` and a file already there stays intact."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise SdtuneError(f"Artifact path {path} must end in {SAFETENSORS_SUFFIX}; rename the output.")
    meta, prepared = _check_metadata(metadata), _prepare(tensors)

    def write(tmp: Path) -> None:
        st.save_file(prepared, tmp, metadata=meta)
        _sort_metadata_in_place(tmp)

    return atomic_write_via(path, write)


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite the header with its metadata keys sorted. safetensors writes them in hash order, which
    changes from save to save, so two identical runs would give files with different bytes and hashes.
    The sorted header has the same length (same keys and values), so only those bytes change."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # not expected: the writer's JSON escaping differs from ours; keep its own
            return
        f.seek(8)
        f.write(text.ljust(length, b" "))  # the format pads the header with spaces


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp sibling folder to fill; on success it replaces `path`, on failure it is removed and
    `path` (absent, or the previous folder) is left as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SdtuneError(f"Could not write {path}: a file is already there; choose a folder name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path, folder=True)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent, directory=True)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_via(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Run `write(tmp)` on a temp sibling that keeps the suffix (image writers pick the format from it),
    then rename it into place; on failure nothing appears at `path`."""
    path = Path(path)
    return atomic_write_many([(path, write)])[0]


def atomic_write_many(writes: list[tuple[Path, Callable[[Path], Any]]]) -> list[Path]:
    """Write several files as one: every target is checked, then every file goes to a temp sibling, and only
    when all are complete are they renamed into place. A failure before the renames leaves every target as
    it was (absent, or the old file)."""
    targets = [Path(path) for path, _ in writes]
    for path in targets:
        refuse_special(path)
    temps: list[Path] = []
    try:
        for path, (_, write) in zip(targets, writes):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                temps.append(temp_sibling(path))
                mode = stat.S_IMODE(temps[-1].stat().st_mode)  # the umask's, before a writer replaces the file
                write(temps[-1])
                os.chmod(temps[-1], mode)
                _fsync(temps[-1])
            except (OSError, SafetensorError) as exc:
                raise _write_error(path, exc) from exc
        for path, tmp in zip(targets, temps):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _write_error(path, exc) from exc
        for folder in {path.parent for path in targets}:
            _fsync(folder, directory=True)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return targets


# What a path that is no regular file is, by the first test that holds (stat only: a FIFO is never opened).
_NOT_A_FILE: tuple[tuple[Callable[[Path], bool], str], ...] = (
    (Path.is_dir, "is a folder, not a file"),
    (Path.exists, "is a pipe, device or socket, not a file"),
    (lambda path: True, "does not exist"),
)


def check_readable(path: Path) -> None:
    if not path.is_file():
        what = next(text for test, text in _NOT_A_FILE if test(path))
        raise SdtuneError(f"Artifact {path} {what}; check the path.")


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable(path, "safetensors", exc) from exc
    check_tensors(path, tensors)
    return tensors, metadata


def _load_pickle(path: Path) -> Any:
    """torch.load(weights_only=True) of a pickle whose structure was bounded first; every tensor checked."""
    check_pickle(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SdtuneError(
            f"{path} may contain code (it needs more than tensors and plain data) and was not loaded; "
            "convert it to .safetensors with a tool you trust."
        ) from exc
    except Exception as exc:  # damaged bytes surface as any of many types (IndexError, KeyError, struct.error...)
        raise unreadable(path, "torch", exc) from exc
    check_tensors(path, obj)
    return obj


def load_artifact(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; (raw object, {}) of a .pt/.ckpt/.bin pickle, loaded
    with `torch.load(weights_only=True)` only, so a pickle that carries code is refused."""
    path = Path(path)
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path), {}
    raise SdtuneError(f"{path} has an unknown extension {suffix!r}; use .safetensors, {', '.join(PICKLE_SUFFIXES)}.")


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested dict/list (e.g. a loaded pickle) under dotted keys; other leaves are skipped.
    The walk is bounded (see untrusted.iter_tensors), so shared references cannot make it explode."""
    return dict(iter_tensors(obj, prefix))


def file_hash(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Full sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    except OSError as exc:
        raise SdtuneError(f"Could not read {path} to hash it: {exc.strerror or exc}.") from exc
    return digest.hexdigest()


def model_hash(state: Mapping[str, torch.Tensor] | torch.nn.Module, length: int = 10) -> str:
    """Short sha256 over sorted names, dtypes, shapes and bytes of a state dict (or a module's)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]
