"""Folder scans over trees sdtune does not control (artifact folders default to the current directory).

Only regular files are returned, judged by `os.stat` and never by opening them, so a FIFO or device named
`x.safetensors` cannot block a read; each folder is entered once (by device and inode), so symlink loops end;
hidden names (a leading '.') are skipped, which hides the temp files of interrupted atomic writes; and a
scan stops with a clear error past MAX_ENTRIES entries instead of walking a whole disk.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path

from .errors import SdtuneError

MAX_ENTRIES = 200_000  # files and folders looked at in one scan; artifact and image folders hold far fewer


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file (a link is followed); False for folders, FIFOs, devices, sockets."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, broken link, unreadable parent, NUL in the name
        return False


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:  # vanished or unreadable: nothing to find there
        return []


def regular_files(
    folder: str | os.PathLike,
    suffixes: Collection[str] | None = None,
    *,
    recursive: bool = True,
    skip_dir: Callable[[str], bool] = lambda name: False,
    limit: int = MAX_ENTRIES,
) -> list[Path]:
    """Regular, non-hidden files under `folder` whose suffix (any case) is in `suffixes` (all when None),
    shallowest first then by path; folders named so that `skip_dir(name)` holds are not entered."""
    root = Path(folder)
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    queue, seen = deque([root]), 0
    while queue:
        current = queue.popleft()
        try:
            info = os.stat(current)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in visited:  # a symlink loop, or one folder linked twice
            continue
        visited.add((info.st_dev, info.st_ino))
        for entry in _entries(current):
            seen += 1
            if seen > limit:
                raise SdtuneError(f"{root} holds more than {limit:,} files and folders to scan; "
                                  "point sdtune at the folder that holds your files.")
            if entry.name.startswith("."):
                continue
            try:
                mode = os.stat(entry.path).st_mode  # follows links: a link to a FIFO is a FIFO
            except OSError:
                continue
            if stat.S_ISDIR(mode) and recursive and not skip_dir(entry.name):
                queue.append(Path(entry.path))
            elif stat.S_ISREG(mode) and (wanted is None or Path(entry.name).suffix.lower() in wanted):
                found.append(Path(entry.path))
    return sorted(found, key=lambda p: (len(p.relative_to(root).parts), str(p)))
