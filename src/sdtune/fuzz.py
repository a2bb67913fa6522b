"""Fuzz sdtune's readers of untrusted input: `python -m sdtune.fuzz --cases 10000`.

Each target draws inputs with hypothesis (see sdtune.fuzz_inputs) and runs sdtune on them the way a
command would: load a file, sniff and decode it as every artifact kind, apply what decodes to a model and
run it, parse prompts and config files, open images. The only exception allowed out is SdtuneError (a
clear refusal); anything else is a crash, reported with the smallest input hypothesis finds. A pickle that
would create a marker file is among the inputs, and a marker that appears is a crash too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SdtuneError


@dataclass
class Context:
    """What checks share: a scratch folder, a marker no input may create, and base models built once
    (rebuilt only after an input changed one)."""

    folder: Path
    models: dict[str, Any] = field(default_factory=dict)
    signatures: dict[str, tuple] = field(default_factory=dict)
    refused: bool = False
    read: bool = False  # a reader went all the way: applied and ran, parsed, built or decoded

    @property
    def marker(self) -> Path:
        return self.folder / "code-ran"

    def model(self, family: str = "sd1"):
        """tiny:<family>, unchanged by earlier inputs."""
        if family not in self.models or _signature(self.models[family]) != self.signatures[family]:
            from .model import load

            self.models[family] = load(f"tiny:{family}")
            self.signatures[family] = _signature(self.models[family])
        return self.models[family]

    def file(self, data: bytes, suffix: str) -> Path:
        path = self.folder / f"case{suffix}"
        path.write_bytes(data)
        return path

    def mark_read(self, result: Any) -> Any:
        """Note that a reader went all the way on this input."""
        self.read = True
        return result

    def refusals_allowed(self, *calls: Callable[[], Any]) -> None:
        """Run each call; an SdtuneError stops only that call (and counts the input as refused)."""
        for call in calls:
            try:
                call()
            except SdtuneError:
                self.refused = True


def _signature(model) -> tuple:
    """Cheap evidence that an artifact was applied: module counts, tokenizer size, extras."""
    hypernetworks = model.extras.get("hypernetworks")
    return (sum(1 for _ in model.unet.modules()), sum(1 for e in model.text_encoders for _ in e.modules()),
            len(model.tokenizer), tuple(e.get_input_embeddings().weight.shape[0] for e in model.text_encoders),
            tuple(sorted(model.extras)), len(hypernetworks.entries) if hypernetworks else 0)


@dataclass(frozen=True)
class Target:
    """One fuzzed reader: its input strategy and the check that runs sdtune on a drawn input."""

    name: str
    strategy: Callable[[Context], Any]
    check: Callable[[Any, Context], None]


@dataclass
class Outcome:
    """One target's run: inputs tried, how many a reader took to the end, how many it refused, any crash."""

    target: str
    cases: int = 0
    refused: int = 0
    read: int = 0
    seconds: float = 0.0
    crash: str = ""


# Checks ---------------------------------------------------------------------------------------------------

def check_file(data: bytes, suffix: str, ctx: Context) -> None:
    """What `inspect`, `generate` (tags and names written as words) and `convert` do with a file, in turn."""
    from .artifacts import load_artifact
    from .inspection import describe_artifact
    from .methods import registry

    path = ctx.file(data, suffix)
    ctx.refusals_allowed(lambda: describe_artifact(path),
                         *(lambda cls=cls: cls.prompt_words(path) for cls in registry().values() if cls.found_by_name))
    obj, metadata = load_artifact(path)
    decode_everywhere(obj, metadata, path, ctx)


def decode_everywhere(obj: Any, metadata: dict, path: Path, ctx: Context, family: str = "sd1") -> None:
    """Sniff `obj` and decode it as every kind a prompt applies; whatever decodes is applied and the model run."""
    from .artifacts import flatten_tensors
    from .formats import sniff_format
    from .methods import prompt_applied

    ctx.refusals_allowed(lambda: sniff_format(list(flatten_tensors(obj)), metadata))
    for cls in prompt_applied():
        cls.recognises(obj, metadata)
        ctx.refusals_allowed(lambda: ctx.mark_read(apply_and_run(cls, obj, metadata, path, ctx.model(family))))


def apply_and_run(cls, obj: Any, metadata: dict, path: Path, model) -> bool:
    """generate's path for one artifact: decode, apply at weight 0.5, then one text + UNet forward pass."""
    import torch

    from .conditioning import encode

    method = cls()
    method.apply(model, method.decode_file(model, obj, metadata, path), 0.5, name="fz")
    with torch.no_grad():
        cond = encode(model, ["a fz dog"])
        latents = torch.zeros(1, model.unet.config.in_channels, 8, 8)
        model.unet(latents, torch.tensor([10]), cond.hidden_states, added_cond_kwargs=cond.added)
    return True


def check_pickle(data: bytes, ctx: Context) -> None:
    """A .pt input; afterwards the marker a code-carrying pickle aims at must not exist."""
    try:
        check_file(data, ".pt", ctx)
    finally:
        if ctx.marker.exists():
            ctx.marker.unlink()
            raise AssertionError("unpickling ran code: the marker file was created")


def check_prompt(text: str, ctx: Context) -> None:
    """generate's prompt handling: tags stripped and resolved, emphasis parsed, text split into chunks."""
    from .prompt import MAX_TAG_WEIGHT, parse_artifact_tags, parse_emphasis, resolve_artifact
    from .prompt_embeds import tokenize_weighted

    clean, tags = parse_artifact_tags(text)
    assert all(math.isfinite(t.weight) and abs(t.weight) <= MAX_TAG_WEIGHT for t in tags), tags
    parse_emphasis(text)
    ctx.mark_read(tokenize_weighted(ctx.model().tokenizer, clean))
    for tag in tags:
        ctx.refusals_allowed(lambda: resolve_artifact(tag, [ctx.folder]))


def check_config(sections: Any, ctx: Context) -> None:
    """Config values as a YAML file would give them, and the same file's text parsed."""
    import json

    from .config import DataConfig, TrainConfig, build, load_config_file
    from .methods import registry

    path = ctx.file(json.dumps(sections, default=str).encode(), ".yaml")
    ctx.refusals_allowed(lambda: load_config_file(path))
    if not isinstance(sections, dict):
        return
    methods = registry()
    for section, values in sections.items():
        cls = {"data": DataConfig, "train": TrainConfig}.get(section)
        cls = cls or (methods[section].config_class if section in methods else None)
        if cls is not None:
            ctx.refusals_allowed(lambda: assert_typed(ctx.mark_read(
                build(cls, values if isinstance(values, dict) else {}, section))))


def assert_typed(config: Any) -> None:
    """A built config holds exactly each field's declared type (bool is no int), finite and within its bounds."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), type(f.default)
        assert type(value) is kind, (f.name, value)
        if kind in (int, float):
            low, high = f.metadata.get("min"), f.metadata.get("max")
            assert math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high), \
                (f.name, value)


def check_config_text(data: bytes, ctx: Context) -> None:
    """A config file's bytes as `--config` reads them: size, encoding and alias expansion bounded."""
    from .config import load_config_file

    ctx.refusals_allowed(lambda: ctx.mark_read(load_config_file(ctx.file(data, ".yaml"))))


def check_generate_options(options: Any, ctx: Context) -> None:
    """generate's option check: what it lets through is whole, finite, in range and sized in multiples of 8."""
    from .generate import LIMITS, SIZE_MULTIPLE, check_options

    check_options(options)
    for name, (_, kind, low, high) in LIMITS.items():
        value = getattr(options, name)
        assert value is None or (not isinstance(value, bool) and low <= value <= high), (name, value)
        assert value is None or kind is not int or type(value) is int, (name, value)
    assert options.width % SIZE_MULTIPLE == 0 and options.height % SIZE_MULTIPLE == 0, options
    assert bool(options.width) == bool(options.height), options
    ctx.mark_read(options)


def check_special_tree(entries: list[tuple[str, str]], ctx: Context) -> None:
    """Every folder scan over a tree of FIFOs, links and hidden temp files ends, listing only regular,
    visible files (a FIFO that were listed would be opened, and block, by the reader that follows)."""
    import shutil

    from .data import load_image_folder
    from .fuzz_inputs import build_tree
    from .prompt import artifact_candidates
    from .scan import is_regular_file
    from .ui.library import scan

    root = ctx.folder / "tree"
    shutil.rmtree(root, ignore_errors=True)
    build_tree(root, entries)
    listed = [*artifact_candidates(root, (".safetensors", ".pt", ".bin")), *(entry.path for entry in scan([root]))]
    ctx.refusals_allowed(lambda: listed.extend(record.path for record in load_image_folder(root)))
    bad = [p for p in listed if not is_regular_file(p) or any(s.startswith(".") for s in p.relative_to(root).parts)]
    if bad:
        raise AssertionError(f"a folder scan listed {bad[0]}, which is no regular visible file")
    ctx.mark_read(listed)


def check_image(data: bytes, suffix: str, ctx: Context) -> None:
    """A subject image as training opens it."""
    from .data import load_image

    ctx.refusals_allowed(lambda: ctx.mark_read(load_image(ctx.file(data, suffix))))


def targets() -> list[Target]:
    """Every fuzzed reader, cheapest first."""
    from hypothesis import strategies as st

    from . import fuzz_inputs as fi

    def pickles(ctx: Context):
        return st.one_of(fi.mutated(fi.pickle_seeds()), st.binary(max_size=fi.MAX_BYTES),
                         st.just(fi.code_pickle(ctx.marker)),
                         fi.mutated([fi.code_pickle(ctx.marker)]))

    return [
        Target("prompt parser", lambda ctx: fi.prompts(), check_prompt),
        Target("config values", lambda ctx: fi.config_sections(), check_config),
        Target("config files", lambda ctx: fi.yaml_texts(), check_config_text),
        Target("generate options", lambda ctx: fi.generate_options(), check_generate_options),
        Target("images", lambda ctx: st.one_of(*(st.tuples(fi.mutated([data]), st.just(suffix))
                                                 for data, suffix in fi.image_seeds())),
               lambda case, ctx: check_image(*case, ctx)),
        Target("safetensors files", lambda ctx: st.one_of(fi.mutated(fi.safetensors_seeds()), fi.crafted_safetensors(),
                                                          st.binary(max_size=fi.MAX_BYTES)),
               lambda data, ctx: check_file(data, ".safetensors", ctx)),
        Target("pickle files", pickles, check_pickle),
        Target("hostile pickles", lambda ctx: fi.hostile_pickles(), check_pickle),
        Target("special files", lambda ctx: fi.special_trees(), check_special_tree),
        Target("LoRA decoder", lambda ctx: fi.lora_states(),
               lambda case, ctx: decode_everywhere(*case, Path("fz.safetensors"), ctx)),
        Target("embedding decoder", lambda ctx: fi.embedding_objects(),
               lambda case, ctx: decode_everywhere(case[0], case[1], Path("fz.pt"), ctx, case[2])),
        Target("hypernetwork decoder", lambda ctx: fi.hypernetwork_objects(),
               lambda obj, ctx: decode_everywhere(obj, {}, Path("fz.pt"), ctx)),
    ]


# Runner ---------------------------------------------------------------------------------------------------

@contextmanager
def quiet() -> Iterator[None]:
    """Library warnings and log lines would drown the report; errors still surface as exceptions."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def fuzz_target(target: Target, cases: int, seed: int, ctx: Context) -> Outcome:
    """Run one target for `cases` inputs; a crash stops it, reported with hypothesis's smallest input."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fixed_seed

    outcome, last = Outcome(target.name), {}

    @fixed_seed(seed)
    @settings(max_examples=cases, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, print_blob=False)
    @given(target.strategy(ctx))
    def run(value: Any) -> None:
        outcome.cases += 1
        last["value"], ctx.refused, ctx.read = value, False, False
        try:
            target.check(value, ctx)
        except SdtuneError:
            ctx.refused = True
        outcome.refused += ctx.refused
        outcome.read += ctx.read

    started = time.perf_counter()
    try:
        run()
    except Exception as exc:  # the crash hypothesis found, re-raised for its smallest input
        where = traceback.extract_tb(exc.__traceback__)[-1]
        outcome.crash = (f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} at {Path(where.filename).name}:"
                         f"{where.lineno} ({where.name}) | input: {last.get('value')!r:.300}")
    outcome.seconds = time.perf_counter() - started
    return outcome


def run(cases: int = 10_000, seed: int = 0, only: list[str] | None = None) -> list[Outcome]:
    """Fuzz every target (or those named in `only`), `cases` inputs in all, split evenly."""
    chosen = [t for t in targets() if not only or t.name in only]
    if not chosen:
        raise SdtuneError(f"No fuzz target is called {only}; known targets: {', '.join(t.name for t in targets())}.")
    from .runtime import one_thread

    share = max(1, cases // len(chosen))
    with tempfile.TemporaryDirectory(prefix="sdtune-fuzz-") as tmp, quiet(), one_thread():
        ctx = Context(Path(tmp))
        return [fuzz_target(target, share, seed, ctx) for target in chosen]


def report(outcomes: list[Outcome]) -> str:
    """A markdown table of cases, refusals, crashes and time per target."""
    rows = ["| target | cases | read to the end | refused somewhere (SdtuneError) | crashes | seconds |",
            "|---|---|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| {o.target} | {o.cases:,} | {o.read:,} | {o.refused:,} | {1 if o.crash else 0} | "
                    f"{o.seconds:.1f} |")
    total = sum(o.cases for o in outcomes)
    crashes = [o for o in outcomes if o.crash]
    rows.append(f"| **all** | **{total:,}** | {sum(o.read for o in outcomes):,} | {sum(o.refused for o in outcomes):,} "
                f"| **{len(crashes)}** | {sum(o.seconds for o in outcomes):.1f} |")
    rows += [f"\ncrash in {o.target}: {o.crash}" for o in crashes]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="inputs in all, split evenly over the targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", help="fuzz only this target (repeatable)")
    args = parser.parse_args(argv)
    try:
        outcomes = run(args.cases, args.seed, args.target)
    except ImportError as exc:
        message = f"{exc.name} is missing; pip install 'sdtune[test]'."
    except SdtuneError as exc:
        message = str(exc)
    else:
        print(report(outcomes))
        return 1 if any(o.crash for o in outcomes) else 0
    print(f"sdtune fuzz: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
