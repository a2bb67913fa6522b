"""Command line: argv -> config objects -> library calls. No logic of its own; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import GENERATE_STEPS, DataConfig, TrainConfig, build, load_config_file
from .errors import SdtuneError
from .flags import add_dataclass_args, flag_values
from .formats.clients import CLIENTS
from .progress import quiet_libraries

MAX_STEPS_VARIABLE = "SDTUNE_MAX_STEPS"
WINDOWS_ILLEGAL = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads the registry: a method registered by mistake is named in one line
    except SdtuneError as exc:
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        quiet_libraries()
        return args.handler(args) or 0
    except SdtuneError as exc:
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`sdtune inspect F | head`): stop quietly, as shell tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141
    except Exception as exc:  # a bug, not bad input: one line, code 1; --debug shows the traceback
        if args.debug:
            raise
        reason = " ".join(str(exc).split())[:300]
        print(f"sdtune: error: {type(exc).__name__}: {reason} (rerun as 'sdtune --debug ...' for the traceback)",
              file=sys.stderr)
        return 1


class _Parser(argparse.ArgumentParser):
    """argparse with sdtune's one-line errors: what is wrong and where the usage is, without a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    from . import methods
    from .extract_lora import DEFAULT_LAYOUT, LAYOUT_NAMES

    registered = methods.registry()  # every method's subcommand, settings, tags and layouts come from here
    labels = [cls.label for cls in registered.values()]
    parser = _Parser(prog="sdtune", description=f"Personalise Stable Diffusion models: {methods.listing(labels)}.")
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = sub.add_parser("train", help="train a method on a subject")
    train_methods = train.add_subparsers(title="methods", metavar="METHOD")
    for method, method_cls in registered.items():
        p = train_methods.add_parser(method, help=f"train {method_cls.label}", epilog=_builtin_defaults_text(method))
        _add_model_args(p)
        p.add_argument("--output", required=True, help="folder for the artifact, checkpoints and logs")
        p.add_argument("--name", help="artifact name (default: the token, made file-name safe)")
        p.add_argument("--config", help="YAML or TOML file with data/train/<method> sections; flags override it")
        p.add_argument("--quiet", action="store_true", help="no progress and no hints: only the written paths")
        add_dataclass_args(p, DataConfig)
        add_dataclass_args(p, TrainConfig)
        add_dataclass_args(p, method_cls.config_class)
        p.set_defaults(handler=cmd_train, method=method)

    gen = sub.add_parser("generate", help="generate images, with artifacts named in the prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help=f"prompt; {methods.prompt_syntax()}")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--artifacts", action="append", default=[], metavar="DIR",
                     help="folder to find artifacts in (repeatable; default: the current folder)")
    gen.add_argument("--steps", type=int, default=GENERATE_STEPS)
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the pipeline's, 7.5 on SD1/SD2, 5.0 on SDXL)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-n", "--count", type=int, default=1)
    gen.add_argument("--scheduler", default="", help="scheduler name (default: the model's own)")
    gen.add_argument("--clip-skip", type=int, default=1, help="A1111 clip skip: 1 = last text-encoder layer, 2 = penultimate")
    gen.add_argument("--width", type=int, default=0)
    gen.add_argument("--height", type=int, default=0)
    gen.add_argument("--output", required=True, help="image path (PNG/JPEG); with -n K also PATH-0 ... PATH-K-1")
    gen.set_defaults(handler=cmd_generate)

    targets = methods.conversion_targets()
    conv = sub.add_parser("convert", help=f"convert an artifact between {methods.listing(list(targets))} layouts")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--to", choices=targets)
    conv.add_argument("--model", help="base model whose layer names resolve ambiguous keys (default: by family)")
    conv.add_argument("--for", dest="client", type=str.lower, choices=tuple(CLIENTS),
                      help="the generator you will load it in: without --to, the layout that loads best there")
    conv.set_defaults(handler=cmd_convert)

    insp = sub.add_parser("inspect", help="print an artifact's format, tensors and run card")
    insp.add_argument("file")
    insp.set_defaults(handler=cmd_inspect)

    ext = sub.add_parser("extract-lora", help="turn a fine-tuned model (e.g. DreamBooth) into a LoRA file")
    ext.add_argument("--base", required=True, help="the model it was fine-tuned from (same specs as --model)")
    ext.add_argument("--tuned", required=True, help="the fine-tuned model (pipeline folder or single file)")
    ext.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    ext.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha recorded in the file (0: alpha = rank)")
    ext.add_argument("--targets", default="attn", help="UNet layer groups (attn, ff, conv) or module-name suffixes")
    ext.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                     help="also extract the text encoders' attention projections where they changed")
    ext.add_argument("--format", choices=LAYOUT_NAMES, default=DEFAULT_LAYOUT, help="file layout")
    ext.add_argument("--model-config", help="local diffusers folder giving single-file checkpoints' architecture")
    ext.add_argument("--output", required=True, help="the LoRA .safetensors file to write")
    ext.set_defaults(handler=cmd_extract_lora)

    bench = sub.add_parser("bench", help="time each method's real training step; artifact sizes; scaling tables")
    bench.add_argument("kind", nargs="?", default="steps", choices=("steps", "sizes", "scaling", "sharding"),
                       help="steps: timed runs (default); sizes: full-scale artifact sizes; scaling: step time "
                            "and peak memory against --resolutions and --batch-sizes; sharding: trained state "
                            "per process at 1-8 processes (ddp / fsdp)")
    bench.add_argument("--model", default="tiny:sd1", help="random:sd15|sd2|sdxl (full size, for GPUs), tiny:sd1|sd2|sdxl, "
                       "or any --model spec")
    bench.add_argument("--method", default=methods.first(),
                       help=f"comma list of methods ({', '.join(registered)}), or all")
    bench.add_argument("--compile", default="auto", help="comma list of UNet modes (auto, off, cuda-graphs, default, "
                       "reduce-overhead, max-autotune); each is its own run")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--resolution", type=int, default=0, help="pixels (0: the model's native resolution)")
    bench.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph capture, compiling)")
    bench.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                       help="auto: bf16 on CUDA, none on a CPU")
    bench.add_argument("--channels-last", action="store_true", help="channels-last UNet")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--output", default="", help="keep the artifacts in this folder (default: discarded)")
    bench.add_argument("--resolutions", default="256,512,768,1024", help="scaling: comma list of pixels")
    bench.add_argument("--batch-sizes", default="1,4,16", help="scaling: comma list of batch sizes")
    bench.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    bench.set_defaults(handler=cmd_bench)

    from .toyworld.catalogue import DEFAULT_SUBJECT, SUBJECTS

    cmp = sub.add_parser("compare", help="train every method on builtin subjects or your own and report them side "
                         "by side")
    _add_model_args(cmp)
    cmp.add_argument("--images", default="", help="folder of subject images (default: the builtin subjects)")
    cmp.add_argument("--subjects", default="", metavar="NAME[,NAME...]|all",
                     help=f"builtin subjects to compare on, each with the same recipes (default: {DEFAULT_SUBJECT}; "
                     f"all: {', '.join(SUBJECTS)})")
    cmp.add_argument("--token", default="", help="the subject's identifier (default: sks)")
    cmp.add_argument("--class-word", default="", help="the subject's class, e.g. dog (needed with --images; on the "
                     "builtin model one of its shapes, e.g. star)")
    rows = [row for cls in registered.values() for row in methods.rows_of(cls)]
    extra = [row.name for row in rows if not row.in_default]
    cmp.add_argument("--methods", default="default", help=f"default (every row but {', '.join(extra) or 'none'}), all, "
                     f"or a comma list of rows or methods ({', '.join(row.name for row in rows)})")
    cmp.add_argument("--seeds", type=int, default=1, help="seeds per row: quality pooled over them, costs averaged")
    cmp.add_argument("--config", help="YAML/TOML file deep-merged over the recommended settings: eval and data "
                     "(as in sdtune/compare/recipes.yaml) and rows (ROW: {method, train, data, METHOD, token})")
    cmp.add_argument("--clip-model", help="CLIP folder or hub id for CLIP-I and CLIP-T (own subjects)")
    cmp.add_argument("--dino-model", help="DINO ViT folder or hub id for DINO, prior preservation and diversity "
                     "(own subjects)")
    cmp.add_argument("--fresh", action="store_true", help="retrain runs a previous compare into OUTPUT finished")
    cmp.add_argument("--jobs", type=int, default=0, help="runs at a time (default 0: on a CPU with the builtin or a "
                     "tiny model one per core, up to 4, each on its share of the threads; otherwise 1)")
    cmp.add_argument("--quiet", action="store_true", help="no progress display")
    cmp.add_argument("--output", default="out/compare", help="folder for the runs, results.json, report.md and "
                     "report.html (default: out/compare)")
    cmp.set_defaults(handler=cmd_compare)

    subj = sub.add_parser("subject", help="write a builtin subject's images with captions, to train on")
    subj.add_argument("folder", help="folder to write into (created; may not hold other files)")
    subj.add_argument("--subject", default=DEFAULT_SUBJECT, metavar="NAME",
                      help=f"which builtin subject (default: {DEFAULT_SUBJECT}): "
                      + "; ".join(f"{s.name}, {s.kind}: {s.description}" for s in SUBJECTS.values()))
    subj.set_defaults(handler=cmd_subject)

    ui = sub.add_parser("ui", help="local web UI to train, generate, compare and convert (needs sdtune[ui])")
    _add_model_args(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (0: a free one)")
    ui.add_argument("--workspace", default="sdtune-ui", help="folder for uploads, trainings, images, comparisons")
    ui.add_argument("--artifacts", action="append", default=[], metavar="DIR",
                    help="more folders to find artifacts in (repeatable)")
    ui.set_defaults(handler=cmd_ui)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin", help="diffusers folder, .safetensors/.ckpt file, hub id, "
                        "builtin, tiny:sd1|sd2|sdxl or random:sd15|sd2|sdxl (default: builtin)")
    parser.add_argument("--model-config", help="local diffusers folder giving a single-file checkpoint's architecture")


def _builtin_defaults_text(method: str) -> str:
    from . import methods
    from .compare.recipes import describe_defaults, training_defaults

    cls = methods.get(method)
    rows = ", ".join(row.name for row in methods.rows_of(cls))
    picked = (f" {' and '.join('--' + k.replace('_', '-') for k in cls.recipe_keys)} pick the compare row whose "
              f"recipe is used ({rows}).") if cls.recipe_keys else ""
    return (f"With --model builtin (the default) the defaults are the builtin model's recipe, the one `sdtune "
            f"compare` measured: {describe_defaults(training_defaults('builtin', method))}.{picked} "
            "The defaults shown above are for real Stable Diffusion models.").replace("%", "%%")


def default_name(token: str) -> str:
    """The artifact name: the token with characters Windows forbids in file names replaced."""
    name = WINDOWS_ILLEGAL.sub("_", token).strip(" .")
    return name or "artifact"


def _capped(train_cfg: TrainConfig) -> TrainConfig:
    """The steps capped by SDTUNE_MAX_STEPS when it is set: a quick try of a command (the README's commands
    are tested that way), the recipe otherwise unchanged."""
    import os

    cap = os.environ.get(MAX_STEPS_VARIABLE, "")
    if not cap:
        return train_cfg
    if not cap.isdigit() or int(cap) < 1:
        raise SdtuneError(f"{MAX_STEPS_VARIABLE}={cap!r} must be a whole number of steps, at least 1.")
    return dataclasses.replace(train_cfg, steps=min(train_cfg.steps, int(cap)))


def cmd_train(args: argparse.Namespace) -> int:
    from . import methods, outputs
    from .model import load
    from .train import train

    from .compare.recipes import merge, training_defaults

    method_cls = methods.get(args.method)
    # The model's recipe, then the config file, then the flags (each overrides the one before); the method
    # settings given pick the recipe (`--algo loha` gets the loha row's).
    config = load_config_file(args.config) if args.config else {}
    chosen = flag_values(args, method_cls.config_class, config.get(args.method, {}))
    file_values = merge(training_defaults(args.model, args.method, chosen), config)
    data_cfg = build(DataConfig, flag_values(args, DataConfig, file_values.get("data", {})), "data")
    train_cfg = _capped(build(TrainConfig, flag_values(args, TrainConfig, file_values.get("train", {})), "train"))
    method_cfg = build(method_cls.config_class,
                       flag_values(args, method_cls.config_class, file_values.get(args.method, {})), args.method)
    method, name = method_cls(method_cfg), args.name or default_name(data_cfg.token)  # the settings, once
    outputs.plan(args.output, name, method.output_files(name, None), train_cfg.log_dir)  # before the model loads
    from .data import load_image_folder

    for folder in filter(None, (data_cfg.images, data_cfg.validation_images)):
        load_image_folder(folder)  # bad images fail before a model loads
    model = load(args.model, config=args.model_config)
    result = train(model, method, train_cfg, data_cfg, Path(args.output), name, progress=not args.quiet)
    for path in result.paths:
        print(path)
    if args.quiet:
        return 0
    # stdout holds only the paths (scripts read them); the hint goes with the progress messages.
    print(f"generate with: sdtune generate {method.usage(args.model, Path(args.output), name, data_cfg.token)} "
          f"--output {name}.png", file=sys.stderr)
    elsewhere = method.client_usage(result.paths[0])  # e.g. the word A1111 knows an embedding by
    if elsewhere:
        print(elsewhere, file=sys.stderr)
    return 0


def _writable_folder(path: str) -> Path:
    """`path` when a folder can be made there; made by the command only when it writes (a failed command
    leaves no empty folder behind)."""
    from .outputs import check_folder_path

    folder = Path(path)
    check_folder_path(folder, "Output folder")
    return folder


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerateOptions, check_image_path, check_options, generate, save_images
    from .model import load

    options = GenerateOptions(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                              seed=args.seed, count=args.count, scheduler=args.scheduler, width=args.width,
                              height=args.height, artifact_dirs=[Path(d) for d in (args.artifacts or ["."])],
                              clip_skip=args.clip_skip, report=lambda line: print(line, file=sys.stderr))
    check_options(options)  # before the model loads
    _writable_folder(str(check_image_path(args.output, args.count).parent))
    model = load(args.model, config=args.model_config)
    for path in save_images(generate(model, args.prompt, options), args.output):
        print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_file

    print(convert_file(Path(args.input), Path(args.output), args.to, args.model, args.client,
                       lambda line: print(line, file=sys.stderr)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import describe_artifact

    print(describe_artifact(Path(args.file)))
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from .extract_lora import extract_lora_file

    print(extract_lora_file(args.base, args.tuned, args.rank, args.output, args.targets, args.format,
                            args.text_encoder, args.alpha or None, args.model_config))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareOptions, run_compare

    options = CompareOptions(str(_writable_folder(args.output)), args.model, args.model_config, args.images,
                             args.token, args.class_word, args.methods, args.seeds, args.config, args.clip_model,
                             args.dino_model, args.fresh, not args.quiet, args.subjects, args.jobs)
    print(run_compare(options))
    return 0


def cmd_subject(args: argparse.Namespace) -> int:
    from .methods import first
    from .toyworld.catalogue import get_subject

    subject = get_subject(args.subject)
    folder = Path(args.folder)
    paths = subject.write_folder(folder)
    method = first()
    print(f"Wrote {len(paths)} images of the builtin subject {subject.name} ('{subject.instance_prompt}') with "
          f"captions to {folder}; train on them with: sdtune train {method} --images {folder} --class-word "
          f"{subject.class_word} --output out/")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import serve

    serve(args.host, args.port, args.model, args.workspace, args.artifacts, args.model_config)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench_report import bench_from_args

    print(bench_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
