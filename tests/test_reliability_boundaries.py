"""Boundaries: every flag, config value and file sdtune reads is checked for type, range and size before work.

Each entry is one CLI command on a hostile input (from the hostile-input pass, cases 10-12). It must exit
with code 2 and ONE stderr line naming the input, print no traceback and write nothing; inputs that would take
unbounded memory or time are refused before they are read, parsed or allocated.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune.cli import main

TRAIN = ["train", "lora", "--model", "tiny:sd1", "--token", "sks", "--class-word", "dog", "--steps", "1",
         "--quiet", "--log-dir", "none"]
KOHYA_SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
GENERATE = ["generate", "--model", "tiny:sd1", "--steps", "1", "--prompt", "a dog"]
# A 472-byte "billion laughs": nine levels of nine aliases, 9**9 strings once expanded.
ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


class Env:
    """A temporary folder with the subject images; builds argv for train and generate."""

    def __init__(self, tmp: Path, subject: Path):
        self.tmp, self.subject = tmp, subject

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def train(self, *args: str) -> list[str]:
        return TRAIN + ["--images", str(self.subject), "--output", str(self.tmp / "out"), *args]

    def config(self, text: str | bytes, name: str = "run.yaml") -> list[str]:
        """Train with settings from a config file alone (flags would override the file's values)."""
        return ["train", "lora", "--model", "tiny:sd1", "--quiet", "--output", str(self.tmp / "out"),
                "--config", str(self.file(name, text))]

    def generate(self, *args: str) -> list[str]:
        return GENERATE + ["--artifacts", str(self.tmp), "--output", str(self.tmp / "o.png"), *args]


def _sparse(env: Env, name: str, size: int) -> Path:
    """A file that claims `size` bytes without using the disk (reading it all would take that much memory)."""
    path = env.tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# id -> (argv builder, fragments the one-line message must hold)
CASES: dict[str, tuple[Callable[[Env], list[str]], tuple[str, ...]]] = {
    # Config files: size, encoding and YAML alias expansion bounded before parsing.
    "config-not-utf8": (lambda e: e.config(b"train:\n  steps: 1 # \xff\xfe\n"), ("run.yaml", "UTF-8")),
    "config-huge-sparse": (lambda e: e.train("--config", str(_sparse(e, "big.yaml", 300 << 20))),
                           ("big.yaml", "larger than")),
    "config-yaml-alias-bomb": (lambda e: e.config(ALIAS_BOMB), ("run.yaml", "aliases")),
    "config-yaml-recursive-anchor": (lambda e: e.config("train: &t {x: *t}\n"), ("run.yaml", "aliases")),
    # Config fields of the wrong type: bool is no number, text must be text.
    "config-token-is-a-number": (lambda e: e.config("data:\n  token: 5\n"), ("data.token", "text")),
    "config-class-word-is-a-list": (lambda e: e.config("data:\n  class_word: [dog, cat]\n"),
                                    ("data.class_word", "text")),
    "config-template-is-a-table": (lambda e: e.config('[data]\nprompt_template = {a = 1}\n', "run.toml"),
                                   ("data.prompt_template", "text")),
    "config-steps-is-true": (lambda e: e.config("train:\n  steps: true\n"), ("train.steps", "number")),
    "config-lr-is-a-list": (lambda e: e.config("train:\n  lr: [1, 2]\n"), ("train.lr", "number")),
    "config-steps-infinite": (lambda e: e.config("train:\n  steps: .inf\n"), ("train.steps", "finite")),
    "config-steps-huge": (lambda e: e.config("train:\n  steps: 1e22\n"), ("train.steps", "between 1 and")),
    "flag-weight-decay-infinite": (lambda e: e.train("--weight-decay", "inf"), ("train.weight_decay", "finite")),
    "flag-seed-past-64-bits": (lambda e: e.train("--seed", str(2**64)), ("train.seed", "between")),
    "flag-resolution-huge": (lambda e: e.train("--resolution", "12000"), ("data.resolution", "4096")),
    "flag-seed-negative": (lambda e: e.train("--seed", "-1"), ("train.seed", "between")),
    # Caption files: size checked before reading.
    "caption-huge-sparse": (lambda e: e.train("--use-captions", "--images", str(_images_with(
        e, lambda folder: _sparse(e, "images/subject_0.txt", 300 << 20)))), ("subject_0.txt", "64 KB")),
    # generate: sizes, counts and numbers refused before the model loads (clip skip once it is known).
    "generate-width-not-a-multiple-of-8": (lambda e: e.generate("--width", "7", "--height", "64"),
                                           ("--width 7", "multiple of 8")),
    "generate-negative-size": (lambda e: e.generate("--width", "64", "--height", "-64"), ("--height", "between")),
    "generate-huge-size": (lambda e: e.generate("--width", "12000", "--height", "64"), ("--width", "4096")),
    "generate-width-alone": (lambda e: e.generate("--width", "64"), ("--width", "--height", "both")),
    "generate-clip-skip-absurd": (lambda e: e.generate("--clip-skip", "100"), ("--clip-skip", "between")),
    "generate-clip-skip-past-the-layers": (lambda e: e.generate("--clip-skip", "3"), ("--clip-skip 3", "1 to 2")),
    "generate-steps-huge": (lambda e: e.generate("--steps", str(10**22)), ("--steps", "1000")),
    "generate-count-huge": (lambda e: e.generate("-n", "100000"), ("--count", "100")),
    "generate-guidance-nan": (lambda e: e.generate("--guidance", "nan"), ("--guidance", "between")),
    "generate-guidance-huge": (lambda e: e.generate("--guidance", "1e300"), ("--guidance", "between")),
    "generate-seed-negative": (lambda e: e.generate("--seed", "-1"), ("--seed", "between")),
    "generate-output-psd": (lambda e: e.generate("--output", str(e.tmp / "o.psd")), ("o.psd", ".psd", ".png")),
    "prompt-tag-weight-huge": (lambda e: e.generate("--prompt", "a dog <lora:x:1e300>"), ("<lora:x:1e300>", "100")),
    # Artifacts whose run card names another family, though their widths fit tiny:sd1.
    "lora-card-says-sd2": (lambda e: e.generate("--prompt", "a dog <lora:other>", "--artifacts", str(_artifact(
        e, "other.safetensors", _lora_sd1(), "sd2"))), ("other.safetensors", "sd2", "sd1")),
    "embedding-card-says-sdxl": (lambda e: e.generate("--prompt", "a emb dog", "--artifacts", str(_artifact(
        e, "emb.safetensors", {"emb_params": torch.zeros(1, 32)}, "sdxl"))), ("emb.safetensors", "sdxl", "sd1")),
}


def _lora_sd1() -> dict:
    """A kohya LoRA whose widths fit tiny:sd1's cross-attention key projection."""
    return {f"{KOHYA_SD1}.lora_down.weight": torch.zeros(2, 32), f"{KOHYA_SD1}.lora_up.weight": torch.zeros(32, 2),
            f"{KOHYA_SD1}.alpha": torch.tensor(2.0)}


def _artifact(env: Env, name: str, tensors: dict, family: str | None) -> Path:
    """A folder with one artifact file, its run card naming `family` (none: no run card)."""
    folder = env.tmp / "artifacts"
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / name, metadata={"base_family": family} if family else None)
    return folder


def _images_with(env: Env, add: Callable[[Path], object]) -> Path:
    """A copy of the subject images with an extra file made by `add`."""
    folder = env.tmp / "images"
    shutil.copytree(env.subject, folder)
    add(folder)
    return folder


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def run_refused(argv: list[str], root: Path, capsys) -> str:
    """Run the CLI; assert exit code 2, one stderr line, no traceback and nothing written; return the line."""
    before = _snapshot(root)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert _snapshot(root) == before, "a refused command left files behind"
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_in_one_line_before_work(case, tmp_path, subject_dir, capsys):
    build, fragments = CASES[case]
    err = run_refused(build(Env(tmp_path, subject_dir)), tmp_path, capsys)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_yaml_anchors_within_the_budget_still_work(tmp_path):
    from sdtune.config import load_config_file

    path = tmp_path / "run.yaml"
    path.write_text("base: &b {steps: 3, lr: 1e-4}\ntrain: *b\n")
    assert load_config_file(path)["train"] == {"steps": 3, "lr": "1e-4"}


def test_numbers_written_as_text_are_still_read(tmp_path):
    """YAML reads 1e-4 (no dot) as text; such numbers keep working, exactly (seeds past 2**53 too)."""
    from sdtune.config import TrainConfig, build

    cfg = build(TrainConfig, {"lr": "1e-4", "steps": "7", "seed": str(2**63 - 1), "batch_size": 2.0}, "train")
    assert (cfg.lr, cfg.steps, cfg.seed, cfg.batch_size) == (1e-4, 7, 2**63 - 1, 2)


def test_the_largest_seed_trains(tmp_path, subject_dir, capsys):
    """Seeds up to 2**63 - 1 train (a derived per-step seed used to overflow torch's 64 bits at ~1.8e14)."""
    env = Env(tmp_path, subject_dir)
    assert main(env.train("--seed", str(2**63 - 1))) == 0, capsys.readouterr().err


def test_many_images_are_sampled_in_chunks(tmp_path):
    """-n 10 runs the pipeline on at most 8 images at a time, so memory does not grow with -n."""
    from sdtune.generate import GenerateOptions, generate
    from sdtune.model import load

    model, sizes = load("tiny:sd1"), []
    real = model.pipeline

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)

        class Spy:
            def __getattr__(self, name):
                return getattr(pipe, name)

            def __call__(self, **call):
                sizes.append(call["num_images_per_prompt"])
                return pipe(**call)

        return Spy()

    model.pipeline = spy
    images = generate(model, "a dog", GenerateOptions(steps=1, count=10))
    assert len(images) == 10 and sizes == [8, 2]

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
           "allocate 1152000000000 bytes.")


class _OutOfMemoryPipeline:
    """A pipeline whose sampling fails as torch's CPU allocator does."""

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, **kwargs):
        raise RuntimeError(CPU_OOM)


def test_cpu_out_of_memory_in_generate_is_advice(tmp_path, capsys, monkeypatch):
    from sdtune.model import SDModel

    monkeypatch.setattr(SDModel, "pipeline", lambda self, *args, **kwargs: _OutOfMemoryPipeline())
    err = run_refused(GENERATE + ["--output", str(tmp_path / "o.png")], tmp_path, capsys)
    assert "ran out of memory on the CPU" in err and "--width/--height" in err and "-n" in err, err


def test_cpu_out_of_memory_in_training_is_advice(tmp_path, subject_dir, capsys, monkeypatch):
    from sdtune import train as train_module

    def oom(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(train_module, "_micro_batch_loss", oom)
    code = main(Env(tmp_path, subject_dir).train())
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "out of memory on the CPU" in err and "--gradient-checkpointing" in err, err
    assert not (tmp_path / "out" / "sks.safetensors").exists()


def _crash(*args, **kwargs):
    raise ZeroDivisionError("boom\nsecond line")


def test_an_unexpected_error_is_one_line_with_exit_code_1(tmp_path, capsys, monkeypatch):
    from sdtune import inspection

    monkeypatch.setattr(inspection, "describe_artifact", _crash)
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("sdtune: error: ZeroDivisionError: boom second line (rerun as 'sdtune --debug ...' for the "
                   "traceback)"), err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from sdtune import inspection

    monkeypatch.setattr(inspection, "describe_artifact", _crash)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "inspect", str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize("family", ["sd1", None], ids=["same-family-card", "no-run-card"])
def test_artifacts_of_the_same_family_or_without_a_card_still_load(family, tmp_path, capsys):
    env = Env(tmp_path, tmp_path)
    folder = _artifact(env, "one.safetensors", _lora_sd1(), family)
    assert main(env.generate("--prompt", "a dog <lora:one:0.5>", "--artifacts", str(folder))) == 0, \
        capsys.readouterr().err


def test_inspect_shows_terminal_escape_codes_from_metadata_as_text(tmp_path, capsys):
    """Metadata can hold escape codes (retitle the terminal, clear it, recolour): inspect prints them visibly."""
    path = tmp_path / "escapes.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={
        "note": "\x1b]0;pwned\x07\x1b[2J", "method": "\x1b[31mlora", "key\x1b[8m\nforged: yes": "v",
        "card": '{"prompt": "a \\u001b[5mdog\\r"}'})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r"), repr(out)
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in out and "\\x1b[31mlora" in out and "\\u001b[5mdog" in out, out
    assert "forged: yes" not in out.splitlines(), out


@pytest.mark.parametrize("options, message", [
    ({"steps": 3.5}, "--steps is 3.5; give a whole number"), ({"count": True}, "-n/--count is True"),
    ({"guidance": float("inf")}, "--guidance is inf"), ({"width": 64}, "--width and --height go together")])
def test_library_callers_get_the_same_generate_checks(options, message):
    """The web UI calls generate() directly: the option checks run there too, before sampling."""
    from sdtune.errors import SdtuneError
    from sdtune.generate import GenerateOptions, check_options

    with pytest.raises(SdtuneError, match=re.escape(message)):
        check_options(GenerateOptions(**options))


@pytest.mark.parametrize("text", ["²", "+-5", "9" * 5000])
def test_odd_number_texts_are_refused_by_name(text):
    """Texts int() half-accepts (a superscript digit passes isdigit) are refused, not raised as ValueError."""
    from sdtune.config import TrainConfig, build
    from sdtune.errors import SdtuneError

    with pytest.raises(SdtuneError, match="^train.warmup_steps "):
        build(TrainConfig, {"warmup_steps": text}, "train")
