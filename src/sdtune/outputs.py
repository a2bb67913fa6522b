"""Every path a training run writes, decided and checked in one place before any work starts.

A run writes into `--output` (its folder) under a name: the method's artifact file(s) or folder, NAME.config.json,
and the run's own subfolders (checkpoints, logs, class images, validation images). This module refuses names
that would leave the folder, refuses to replace anything sdtune did not make there, holds the folder's lock
so two runs cannot interleave their checkpoints, sweeps temp files a killed run left, and on a failed run
removes the folder again when the run created it and left nothing worth keeping.

What sdtune made is recorded in OUTPUT/.sdtune-made.json (relative path -> name); artifacts written by
earlier versions, which kept no record, are recognised by their sdtune run card.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import atomic_write_via, stale_temps
from .errors import SdtuneError

RUN_FOLDERS = ("checkpoints", "logs", "class_images", "validation")  # what a run keeps beside its artifacts
MADE_FILE = ".sdtune-made.json"
LOCK_FILE = ".sdtune.lock"
LEGACY_RUN_CARD = "sdtune_run_card.json"  # inside DreamBooth pipeline folders of every version
# Room left in a 255-byte file name for the longest name derived from NAME (".NAME.config.json.<8>.tmp.json").
MAX_NAME_BYTES = 200


def check_name(name: str, what: str = "--name") -> str:
    """`name` when it names a file inside the output folder, else a one-line refusal."""
    problem = (
        "is empty" if not name.strip() else
        "contains a path separator" if "/" in name or "\\" in name or os.sep in name else
        "is . or .." if name in (".", "..") else
        "starts with a dot (sdtune's temporary files do)" if name.startswith(".") else
        "contains control characters" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
        f"is longer than {MAX_NAME_BYTES} bytes" if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES else
        f"is one of the folders a run keeps in its output ({', '.join(RUN_FOLDERS)})"
        if name.lower() in RUN_FOLDERS else None
    )
    if problem:
        raise SdtuneError(f"{what} {name!r} {problem}; choose a plain file name such as 'sks'.")
    return name


@dataclass
class RunOutputs:
    """The checked targets of one run in `root`; `files`/`folders` are relative paths."""

    root: Path
    name: str
    files: list[str]
    folders: list[str]
    created_root: bool = False
    _lock_fd: int | None = field(default=None, repr=False)

    def targets(self) -> list[Path]:
        return [self.root / rel for rel in [*self.files, *self.folders]]


def plan(root: str | os.PathLike, name: str, outputs: list[str], log_dir: str = "") -> RunOutputs:
    """The run's targets (`outputs`: the method's relative paths, a trailing '/' for a folder), checked:
    the name, the folder path, and that nothing there would be replaced that sdtune did not make."""
    root = Path(root)
    check_name(name)
    check_folder_path(root, "--output")
    files = [rel for rel in outputs if not rel.endswith("/")] + [f"{name}.config.json"]
    folders = [rel.rstrip("/") for rel in outputs if rel.endswith("/")]
    made = _made(root)
    for rel in files:
        _check_replaceable(root / rel, rel, name, made, folder=False)
    for rel in folders:
        _check_replaceable(root / rel, rel, name, made, folder=True)
    if log_dir and log_dir != "none":
        check_folder_path(Path(log_dir), "--log-dir")
    return RunOutputs(root, name, files, folders)


@contextlib.contextmanager
def claim(outputs: RunOutputs, main_process: bool = True) -> Iterator[RunOutputs]:
    """Hold the output folder for a run: create it, lock it (one run at a time), sweep stale temp files of
    this run's targets; on failure remove the folder again if this run created it and nothing is in it.
    Processes other than the main one only use the folder the main one holds."""
    if not main_process:
        yield outputs
        return
    outputs.created_root = not outputs.root.exists()
    try:
        outputs.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SdtuneError(f"Output folder {outputs.root} cannot be created: {exc.strerror}.") from exc
    _lock(outputs)
    ok = False
    try:
        for target in outputs.targets():
            for stale in stale_temps(target):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        yield outputs
        ok = True
    finally:
        _unlock(outputs, remove_root=not ok and outputs.created_root)


def record(outputs: RunOutputs) -> None:
    """Note in the folder's record that sdtune made this run's targets (so a later run may replace them)."""
    made = _made(outputs.root)
    made.update({rel: outputs.name for rel in [*outputs.files, *(f"{rel}/" for rel in outputs.folders)]})
    text = json.dumps(dict(sorted(made.items())), indent=1)
    atomic_write_via(outputs.root / MADE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_folder_path(folder: Path, what: str) -> None:
    """Refuse a folder path that is, or runs through, something other than a folder."""
    for part in [folder, *folder.parents]:
        if os.path.lexists(part):
            if not part.is_dir():
                raise SdtuneError(f"{what} {folder} cannot be used: {part} is a file, not a folder; "
                                  "choose another path.")
            return


def _made(root: Path) -> dict[str, str]:
    """The folder's record of what sdtune made there (empty when there is none or it is unreadable)."""
    path = root / MADE_FILE
    try:
        made = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return {str(k): str(v) for k, v in made.items()} if isinstance(made, dict) else {}


def _check_replaceable(path: Path, rel: str, name: str, made: dict[str, str], folder: bool) -> None:
    """Refuse a target that exists and that sdtune did not make for this name, or that is of the wrong kind."""
    if not os.path.lexists(path):
        return
    kind_ok = path.is_dir() and not path.is_symlink() if folder else path.is_file() and not path.is_symlink()
    if not kind_ok:
        expected = "a folder" if folder else "a file"
        raise SdtuneError(f"{path} is in the way: sdtune writes {expected} there and something else is there; "
                          "move it away or choose another --name or --output.")
    key = f"{rel}/" if folder else rel
    if made.get(key) == name or (key not in made and _made_by_earlier_sdtune(path, folder)):
        return
    raise SdtuneError(f"{path} already exists and sdtune did not write it for --name {name}; move it away or "
                      "choose another --name or --output (sdtune never replaces files it did not make).")


def _made_by_earlier_sdtune(path: Path, folder: bool) -> bool:
    """Whether an unrecorded target carries sdtune's run card (artifacts written before the record existed)."""
    if folder:
        return (path / LEGACY_RUN_CARD).is_file()
    if path.name.endswith(".config.json"):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(config, dict) and {"DataConfig", "TrainConfig"} <= config.keys()
    if path.suffix != ".safetensors":
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return "sdtune_version" in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def _lock(outputs: RunOutputs) -> None:
    """Take the folder's lock; the kernel drops it when the process dies, so a killed run never blocks its
    resume. The lock file is checked to be the one at the path after locking (a releasing run unlinks it)."""
    path = outputs.root / LOCK_FILE
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            raise SdtuneError(f"Could not lock the output folder {outputs.root}: {exc.strerror}.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SdtuneError(f"Another sdtune run{holder} is writing into {outputs.root}; wait for it to "
                                  "finish or choose another --output.") from None
            raise SdtuneError(f"Could not lock the output folder {outputs.root}: {exc.strerror}.") from exc
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            outputs._lock_fd = fd
            return
        os.close(fd)  # locked a file another run had just unlinked: take the new one
    raise SdtuneError(f"Could not lock the output folder {outputs.root}; try again.")


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 20, 0).decode() or "x")
        return f" (process {pid})"
    return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return False


def _unlock(outputs: RunOutputs, remove_root: bool) -> None:
    """Release the lock (unlinking its file while still holding it), then remove a folder the failed run made
    if nothing but its empty run folders is in it."""
    if outputs._lock_fd is None:
        return
    with contextlib.suppress(OSError):
        (outputs.root / LOCK_FILE).unlink()
    os.close(outputs._lock_fd)
    outputs._lock_fd = None
    if remove_root:
        for sub in RUN_FOLDERS:
            with contextlib.suppress(OSError):
                (outputs.root / sub).rmdir()
        with contextlib.suppress(OSError):
            outputs.root.rmdir()
