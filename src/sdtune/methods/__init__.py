"""The method protocol (the one extension point), the data each method declares, and the registry.

A method is a class: it declares what is specific to it as class attributes (name, settings, prompt tag, file
layouts, learning rate, `sdtune compare` rows) and implements the abstract methods of `Method`; optional
capabilities have do-nothing defaults there. `register(MethodClass)` adds it; the CLI, the web UI, bench,
fuzz, compare, generate, inspect and convert all take their list of methods from `registry()`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import SdtuneError
from ..formats import Layout, written_names

# The built-in methods as "module:Class" under sdtune.methods, in menu order (the first is the UI's default);
# each is imported when the registry is first read, not when sdtune or sdtune.methods is imported.
BUILTIN = ("lora:LoRA", "textual_inversion:TextualInversion", "dreambooth:DreamBooth", "hypernetwork:Hypernetwork")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]*")  # a CLI subcommand and config-file section


@dataclass(frozen=True)
class CompareRow:
    """One row a method contributes to `sdtune compare`: its name, its colour in the charts ("" picks a spare
    one) and its settings per compare profile ("builtin": the builtin model, "real": real SD models), in the
    shape of a `sdtune train METHOD --config FILE` file ({"train": ..., "data": ..., METHOD: ...}) plus an
    optional "token" ({token} is the subject's word)."""

    name: str
    colour: str = ""
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # False: run only when asked for (`--methods all` or by name), keeping the default comparison (`sdtune
    # compare` with no --methods, `make demo`) within its time on a laptop CPU
    in_default: bool = True


class Method(abc.ABC):
    """What the shared training loop, generation, conversion and the tools need from a personalisation method.

    Subclasses declare the data below and implement the abstract methods; the rest are optional capabilities
    whose defaults do nothing (methods share no behaviour). The constructor takes the method's settings, an
    instance of `config_class` (None: its defaults), and keeps them as `self.cfg`."""

    # Declared data: the first four have no default.
    name: ClassVar[str]  # CLI subcommand and config section: `sdtune train NAME`
    label: ClassVar[str]  # human name: "Textual Inversion"
    config_class: ClassVar[type]  # the settings dataclass (its fields become `sdtune train NAME` flags)
    default_lr: ClassVar[float]  # a typical learning rate on real models (sdtune bench trains with it)
    layouts: ClassVar[tuple[Layout, ...]] = ()  # file layouts, in the order files are sniffed
    prompt_tag: ClassVar[str] = ""  # a prompt's <TAG:NAME:W> applies the file NAME ("": no tag)
    prompt_tag_aliases: ClassVar[tuple[str, ...]] = ()  # other tags meaning the same (A1111's <lyco:...>)
    found_by_name: ClassVar[bool] = False  # a file applies when a prompt writes its name as a word (embeddings)
    file_noun: ClassVar[str] = "artifact"  # what messages call one of its files ("embedding")
    token_template: ClassVar[str] = "{token}"  # how it spells the subject's word ({token}): "<{token}>" for a new one
    converts: ClassVar[bool] = False  # `sdtune convert` rewrites its files between its layouts (recognises, convert)
    saves_frozen_weights: ClassVar[bool] = False  # the artifact holds frozen weights too: keep them full precision
    shardable: ClassVar[bool] = False  # trains whole components: --distributed fsdp shards them across processes
    # The "parameters" text of generated images names applied files under this A1111 field ("": not named), by
    # the sha256 of the whole file or, as kohya's "addnet" hash, of a .safetensors file's tensor bytes.
    a1111_hash_field: ClassVar[str] = ""
    a1111_hash: ClassVar[str] = "file"  # or "tensors"
    compare_rows: ClassVar[tuple[CompareRow, ...]] = ()  # () : one row named after the method, default settings
    # Settings whose values pick which compare row gives `sdtune train`'s builtin defaults (LoRA: algo, dora;
    # `--algo loha` trains with the loha row's recipe); the row named after the method when none matches.
    recipe_keys: ClassVar[tuple[str, ...]] = ()

    cfg: Any

    # Training ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model) -> list[torch.nn.Parameter] | list[dict]:
        """Freeze the model, inject what trains, return the trainable parameters (or optimizer param
        groups: dicts with "params" and optionally "lr", "lr_factor" (times the run's lr) and "stop_after" (a step
        after which they freeze))."""

    @abc.abstractmethod
    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """The trained values under canonical keys (component-prefixed module paths)."""

    @abc.abstractmethod
    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        """Put trained values back after `setup` (resume from a checkpoint)."""

    @abc.abstractmethod
    def metadata(self) -> dict[str, str]:
        """Method facts for the run card: rank, alpha, tokens, layer structure..."""

    @abc.abstractmethod
    def output_files(self, name: str, fmt: str | None) -> list[str]:
        """The paths `save` writes, relative to the output folder (a trailing '/' marks a folder): checked
        before training starts, so nothing that sdtune did not make is replaced."""

    @abc.abstractmethod
    def save(self, model, out_dir: Path, name: str, card: dict[str, str], fmt: str | None) -> list[Path]:
        """Write the artifact(s) atomically at `output_files(name, fmt)`; return the paths written."""

    @abc.abstractmethod
    def usage(self, model: str, out_dir: Path, name: str, token: str) -> str:
        """How to generate with what `save` wrote on base `model`: `sdtune generate` arguments (printed after
        training)."""

    # Inference --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def apply(self, model, state, weight: float = 1.0, name: str = "") -> None:
        """Inject the learned state into `model`, scaled by `weight`."""

    # Optional capabilities ---------------------------------------------------------------------------------
    def check_data(self, model, data_cfg) -> None:
        """Validate or warn about the data before `setup` (e.g. a common word as the token)."""

    def prompt_templates(self, model) -> list[str] | None:
        """Per-sample prompt wordings instead of the data's one instance template (None: the data's)."""
        return None

    def prompt_token(self, token: str) -> str:
        """The words that stand for the subject's token wherever a training prompt says {token} (captions,
        templates): the token itself unless the method spreads it over several words."""
        return token

    def planned_files(self, model, name: str) -> dict[str, dict[str, torch.Tensor]] | None:
        """What `save` writes, by file, computable on a meta-device model (sdtune bench sizes a full-size artifact
        from it without memory); None: small enough that bench writes the real files."""
        return None

    def decode_file(self, model, obj, metadata: dict[str, str], path: Path):
        """A loaded file in any layout this method reads -> the state `apply` takes (or a clear refusal)."""
        return obj

    def describe(self, state) -> str:
        """A few words about a decoded file for generate's report ("2 vectors"; "": nothing to add)."""
        return ""

    def client_usage(self, path: Path) -> str:
        """How other tools (AUTOMATIC1111, ComfyUI) use a written file, when that needs saying (printed after
        training; "": nothing to say)."""
        return ""

    @classmethod
    def inspect_lines(cls, shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
        """Lines `sdtune inspect` adds about one of its files, from its tensor names and shapes (e.g. a LoRA
        file's algorithm, ranks and layers)."""
        return []

    @classmethod
    def client_layers(cls, shapes: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list[str]:
        """A line per part of one of its files that a client may load or leave out, which its layouts' client
        rules (Layout.clients) match; by default the file is one part, "file"."""
        return ["file"]

    @classmethod
    def prompt_words(cls, path: Path) -> list[str]:
        """The words a prompt writes to apply this file (found_by_name methods; [] when it is none of theirs)."""
        return []

    @classmethod
    def recognises(cls, obj, metadata: dict[str, str]) -> bool:
        """Whether a loaded file is one of this method's artifacts (convert, generate)."""
        return False

    @classmethod
    def convert(cls, obj, metadata: dict[str, str], src: Path, dst: Path, to: str, model_spec: str | None) -> Path:
        """Rewrite a recognised file at `dst` in the written layout `to` (sdtune convert has checked both)."""
        raise SdtuneError(f"sdtune cannot convert {cls.label} files.")


class Registry:
    """The methods sdtune knows, in menu order: classes, or "package.module:Class" imported on first use."""

    def __init__(self, entries: tuple[type | str, ...] = ()):
        self._entries: list[type | str] = list(entries)

    def register(self, method: type | str) -> None:
        self._entries.append(method)

    def copy(self) -> "Registry":
        return Registry(tuple(self._entries))

    def classes(self) -> dict[str, type]:
        """The registered classes by name, each checked (a lazy one whose module is absent is left out)."""
        found: dict[str, type] = {}
        for entry in self._entries:
            cls = _import(entry) if isinstance(entry, str) else entry
            if cls is None:
                continue
            problem = _problem(cls, found)
            if problem:
                raise SdtuneError(f"Method {getattr(cls, '__name__', cls)!r} cannot be registered: {problem}.")
            found[cls.name] = cls
        return found


def _import(entry: str) -> type | None:
    module, _, name = entry.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def _problem(cls, found: dict[str, type]) -> str:
    """What keeps `cls` from being a method beside `found` ("" when nothing)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return "a method is a subclass of sdtune.methods.Method"
    missing = [attr for attr in ("name", "label", "config_class", "default_lr") if getattr(cls, attr, None) is None]
    if missing:
        return f"it declares no {missing[0]}"
    if getattr(cls, "__abstractmethods__", None):
        return f"it does not implement {', '.join(sorted(cls.__abstractmethods__))}"
    if not NAME_PATTERN.fullmatch(cls.name):
        return f"its name {cls.name!r} is not a lower-case word (letters, digits, dashes)"
    if cls.name in found:
        return f"the name {cls.name!r} is taken"
    if not dataclasses.is_dataclass(cls.config_class):
        return "its config_class is not a dataclass"
    taken = {tag for other in found.values() for tag in _tags(other)}
    clash = sorted(taken & set(_tags(cls)))
    return f"the prompt tag {clash[0]!r} is taken" if clash else ""


def _tags(cls) -> tuple[str, ...]:
    return (cls.prompt_tag, *cls.prompt_tag_aliases) if cls.prompt_tag else ()


_REGISTRY = Registry(tuple(f"{__name__}.{entry}" for entry in BUILTIN))


def register(method: type | str) -> None:
    """Make a method available everywhere: a Method subclass, or "package.module:Class" imported on first use
    (how the built-in ones register). It is checked when the registry is next read."""
    _REGISTRY.register(method)


def registry() -> dict[str, type]:
    """The method classes that are available, by name, in menu order."""
    return _REGISTRY.classes()


def first() -> str:
    """The first registered method's name: what menus and examples offer first."""
    return next(iter(registry()))


def get(name: str) -> type:
    methods = registry()
    if name not in methods:
        raise SdtuneError(f"Unknown method '{name}'; available methods are {', '.join(methods)}.")
    return methods[name]


def by_prompt_tag() -> dict[str, type]:
    """Every prompt tag and alias (lower case) -> the method whose files it applies."""
    return {tag: cls for cls in registry().values() for tag in _tags(cls)}


def prompt_applied() -> list[type]:
    """The methods whose files a prompt applies: by a tag, or by writing the file's name."""
    return [cls for cls in registry().values() if cls.prompt_tag or cls.found_by_name]


def prompt_syntax() -> str:
    """How a prompt applies artifacts, in words (help texts): the registered tags and found-by-name files."""
    tags = [f"<{cls.prompt_tag}:NAME:W>" for cls in registry().values() if cls.prompt_tag]
    named = [f"{cls.file_noun}s" for cls in registry().values() if cls.found_by_name]
    parts = ([f"{listing(tags)} apply artifacts"] if tags else []) + \
            ([f"{listing(named)} apply by their names written as words"] if named else [])
    return "; ".join(parts)


def layout_of(cls, name: str) -> Layout | None:
    """The written layout `name` of method `cls` (None: it writes no such layout)."""
    return next((layout for layout in cls.layouts if layout.written and layout.name == name), None)


def loads_in(cls, layout_name: str, shapes: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list:
    """How each client loads a file of method `cls` in layout `layout_name` with these tensor names and shapes:
    a formats.clients.Verdict per client ([] when the layout declares no client rules)."""
    from ..formats.clients import verdicts

    layout = next((lay for lay in cls.layouts if lay.name == layout_name), None)
    if layout is None or not layout.clients:
        return []
    return verdicts(layout.clients, cls.client_layers(shapes, metadata))


def conversion_targets() -> tuple[str, ...]:
    """Every layout `sdtune convert --to` can write, in registry order."""
    return written_names(layout for cls in registry().values() if cls.converts for layout in cls.layouts)


def rows_of(cls) -> tuple[CompareRow, ...]:
    """The `sdtune compare` rows of a method: those it declares, else one named after it."""
    return cls.compare_rows or (CompareRow(cls.name),)


def listing(words: list[str], last: str = "and") -> str:
    """'a, b and c' (for help texts and messages naming every method)."""
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else "".join(words)
