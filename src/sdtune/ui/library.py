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
    """One artifact file: the method it belongs to ("other": none) and the prompt syntax that applies it."""

    path: Path
    kind: str  # the method's name, or "other"
    layout: str
    name: str  # what the prompt writes: the tag name or the embedding's word
    syntax: str = ""  # the text to insert into a prompt ("" for files a prompt cannot name)

    @property
    def label(self) -> str:
        return f"{self.name} · {self.kind} · {self.path.parent.name}/{self.path.name}"


def classify(path: Path) -> ArtifactEntry:
    """Read a file's header (or small pickle) and tell what it is, from the layouts the methods declare;
    unreadable files raise SdtuneError."""
    from ..inspection import artifact_sniff
    from ..methods import registry

    sniffed = artifact_sniff(path)
    cls = registry().get(sniffed.method or "")
    words = cls.prompt_words(path) if cls is not None and cls.found_by_name else []
    if cls is None or (cls.found_by_name and not words):
        return ArtifactEntry(path, "other", sniffed.title, path.stem)
    if cls.prompt_tag:
        return ArtifactEntry(path, cls.name, sniffed.title, path.stem, f"<{cls.prompt_tag}:{path.stem}:1>")
    if words:
        return ArtifactEntry(path, cls.name, sniffed.title, words[0], words[0])
    return ArtifactEntry(path, cls.name, sniffed.title, path.stem)  # e.g. a DreamBooth checkpoint: a --model


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
