"""The artifacts the UI can see: what each file is and how a prompt names it (A1111 syntax)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SdtuneError

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# Folders under an output that hold training by-products, not artifacts a prompt names.
SKIPPED_FOLDERS = {"checkpoints", "class_images", "logs", "validation"}


@dataclass(frozen=True)
class ArtifactEntry:
    """One artifact file: its kind decides the prompt syntax that applies it."""

    path: Path
    kind: str  # lora | hypernet | embedding | other
    layout: str
    name: str  # what the prompt writes: the tag name or the embedding's word

    @property
    def syntax(self) -> str:
        """The text to insert into a prompt ('' for files a prompt cannot name)."""
        if self.kind in ("lora", "hypernet"):
            return f"<{self.kind}:{self.name}:1>"
        return self.name if self.kind == "embedding" else ""

    @property
    def label(self) -> str:
        return f"{self.name} · {self.kind} · {self.path.parent.name}/{self.path.name}"


def classify(path: Path) -> ArtifactEntry:
    """Read a file's header (or small pickle) and tell what it is; unreadable files raise SdtuneError."""
    from ..inspection import artifact_format
    from ..formats.embeddings import file_names

    layout = artifact_format(path)
    lowered = layout.lower()
    if layout.startswith("LoRA"):
        return ArtifactEntry(path, "lora", layout, path.stem)
    if "hypernetwork" in lowered:
        return ArtifactEntry(path, "hypernet", layout, path.stem)
    if "textual" in lowered or "single tensor" in lowered:
        names = file_names(path)
        if names:
            return ArtifactEntry(path, "embedding", layout, names[0])
    return ArtifactEntry(path, "other", layout, path.stem)


def scan(folders: list[Path]) -> list[ArtifactEntry]:
    """Artifact files under `folders` (recursively, skipping checkpoints, logs and diffusers model folders)."""
    entries: list[ArtifactEntry] = []
    for folder in map(Path, folders):
        for path in sorted(_files(folder)):
            try:
                entries.append(classify(path))
            except SdtuneError as exc:
                entries.append(ArtifactEntry(path, "other", f"unreadable: {exc}", path.stem))
    return entries


def _files(folder: Path) -> list[Path]:
    """Regular, visible artifact files (see sdtune.scan), minus diffusers pipeline components."""
    from ..scan import regular_files

    return [p for p in regular_files(folder, SUFFIXES, skip_dir=SKIPPED_FOLDERS.__contains__)
            if not _inside_pipeline(p, folder)]


def _inside_pipeline(path: Path, root: Path) -> bool:
    """True for the component weights of a diffusers pipeline folder (e.g. a DreamBooth output)."""
    return any((parent / "model_index.json").is_file() for parent in path.parents
               if parent != root and parent.is_relative_to(root))


def insert_syntax(prompt: str, syntax: str) -> str:
    """The prompt with `syntax` appended (once), separated by a space."""
    prompt = prompt or ""
    if not syntax or syntax in prompt:
        return prompt
    return f"{prompt.rstrip()} {syntax}".strip()
