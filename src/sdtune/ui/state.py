"""The UI's state, one object per app: where files go, the base model, the training and comparison runners."""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdtuneError

log = logging.getLogger(__name__)


def copy_into(source: Path, folder: Path) -> Path:
    """Copy an uploaded file into a workspace folder under its own (checked) name, atomically: a link already
    at that name is replaced, never written through."""
    import shutil

    from ..artifacts import atomic_write_via
    from ..outputs import check_name

    target = Path(folder) / check_name(source.name, "Uploaded file")
    return atomic_write_via(target, lambda tmp: shutil.copyfile(source, tmp))


def unexpected(action: str, exc: BaseException) -> str:
    """One line for the page about an error that is not a user error; the traceback goes to the server log."""
    log.error("%s failed", action, exc_info=exc)
    return f"{action} failed: {type(exc).__name__}: {exc}".splitlines()[0]


class ModelSource:
    """Loads the base model once and hands out private copies: methods inject into the model they get."""

    def __init__(self, spec: str, config: str | None = None):
        self.spec, self.config = spec, config
        self._base = None
        self._lock = threading.Lock()

    def fresh(self):
        """A copy of the base model that a job may change freely."""
        from ..infotext import model_identity
        from ..model import load

        with self._lock:
            if self._base is None:
                base = load(self.spec, config=self.config)
                base.fingerprint()  # computed once on the pristine weights; copies inherit it
                model_identity(base)  # a checkpoint file's A1111 hash (for images' parameters): read once
                self._base = base
            return copy.deepcopy(self._base)


@dataclass
class Workspace:
    """The folders the UI reads and writes, all under one root unless the user adds artifact folders."""

    root: Path
    extra_artifact_dirs: list[Path] = field(default_factory=list)
    images: Path = field(init=False)  # uploaded and builtin subject image folders
    runs: Path = field(init=False)  # one output folder per training
    uploads: Path = field(init=False)  # artifact files added through the page
    generations: Path = field(init=False)
    comparisons: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        names = ("images", "runs", "artifacts", "generations", "comparisons")
        self.images, self.runs, self.uploads, self.generations, self.comparisons = (self.root / n for n in names)
        for name in names:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def artifact_dirs(self) -> list[Path]:
        """Where the artifacts a prompt names (by tag or by name) are looked up, in this order."""
        return [self.runs, self.uploads, *map(Path, self.extra_artifact_dirs)]

    def listed_dirs(self) -> list[Path]:
        """What the Artifacts tab lists: the prompt's folders plus the comparisons' trained files (runs/ROW/
        seed-S/artifact/, one per row and seed: many share a name, so prompts do not look there)."""
        return [*self.artifact_dirs(), self.comparisons]

    def image_folders(self) -> list[str]:
        """Image folders already in the workspace (uploads, the builtin subject)."""
        return sorted(str(p) for p in self.images.iterdir() if p.is_dir())


class ReportFolders:
    """Comparison report folders opened in the UI, served read-only under a key derived from their path."""

    def __init__(self) -> None:
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    def register(self, folder: str | Path) -> str:
        folder = Path(folder).expanduser().resolve()
        if not (folder / "report.html").is_file():
            raise SdtuneError(f"{folder} has no report.html; choose a folder that `sdtune compare` wrote.")
        key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        with self._lock:
            self._folders[key] = folder
        return key

    def file(self, key: str, relative: str) -> Path | None:
        """The file `relative` inside the registered folder `key`, or None (unknown key, outside, missing)."""
        with self._lock:
            folder = self._folders.get(key)
        if folder is None:
            return None
        path = (folder / relative).resolve()
        return path if path.is_file() and path.is_relative_to(folder) else None
