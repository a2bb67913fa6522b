"""Check a toy-world pipeline: generate at diffusers' defaults, read the images back, score the prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdtune.toyworld.captions import caption, parse_caption
from sdtune.toyworld.evaluate import ATTRIBUTES, attribute_accuracy, judge_images, read_images
from sdtune.toyworld.world import sample_scenes


def probe_prompts(n: int, seed: int = 1234, held_out: bool = False) -> list[str]:
    """n full captions (every optional part said) of random scenes; with held_out, only of the world's
    held-out (shape, colour, background) combinations."""
    b = sample_scenes(n, seed, jitter=False, held_out="only" if held_out else "any")
    return [caption(s.shape, s.colour, s.size, s.position, s.background)
            for s in (b.scene(i) for i in range(n))]


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, batch: int = 64, **kwargs) -> np.ndarray:
    """Images [N,H,W,3] in [0,1] for the prompts at the pipeline's defaults unless kwargs say otherwise."""
    out = []
    for start in range(0, len(prompts), batch):
        g = torch.Generator(device=pipe.device).manual_seed(seed + start)
        out.append(pipe(prompts[start:start + batch], generator=g, output_type="np", **kwargs).images)
    return np.concatenate(out)


def score_prompts(images, prompts: list[str]) -> dict[str, Any]:
    """Per-attribute accuracy of the evaluator's readings against what each prompt asked for, and the
    agreement of the evaluator with the independent judge on the same images."""
    readings = [r.as_dict() for r in read_images(images)]
    asked = [{k: v for k, v in parse_caption(p).items() if k in ATTRIBUTES} for p in prompts]
    judged = judge_images(images)
    acc = attribute_accuracy(readings, asked)
    all_right = [all(r[k] == a[k] for k in ATTRIBUTES if a[k] is not None) for r, a in zip(readings, asked)]
    return {
        "n": len(prompts),
        "accuracy": acc,
        "all_attributes_right": float(np.mean(all_right)),
        "evaluator_vs_judge_agreement": attribute_accuracy(judged, readings),
        "readings": readings,
    }


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    """Save images [N,H,W,3] in [0,1] as one PNG grid (2 px gaps)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = (im * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def closing_check(pipe_dir: Path, report_dir: Path, n: int, device: torch.device, log: Callable = print,
                  held_out: bool = False) -> dict:
    """Load the written folder as a user would, generate n probe images, write a JSON report and a grid."""
    from sdtune.toyworld.models import load_pipeline

    pipe = load_pipeline(pipe_dir, str(device))
    prompts = probe_prompts(n, held_out=held_out)
    images = generate(pipe, prompts)
    result = score_prompts(images, prompts)
    report_dir.mkdir(parents=True, exist_ok=True)
    save_grid(images, report_dir / "builtin_samples.png")
    (report_dir / "builtin_check.json").write_text(json.dumps({"held_out": held_out, "prompts": prompts, **result},
                                                              indent=1))
    acc = " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())
    log(f"[check] {n} images at pipeline defaults: {acc}; all right {result['all_attributes_right']:.2f}")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m sdtune.toyworld.check --n 256 --out DIR`: the closing check on any toy-world pipeline
    (default: the shipped builtin one), at diffusers' defaults."""
    import argparse

    from sdtune.toyworld import builtin_path

    parser = argparse.ArgumentParser(prog="python -m sdtune.toyworld.check", description=main.__doc__)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the builtin model)")
    parser.add_argument("--n", type=int, default=256, help="images (full captions of random scenes)")
    parser.add_argument("--out", required=True, help="folder for builtin_check.json and builtin_samples.png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--held-out", action="store_true",
                        help="prompt only the held-out combinations (meaningful for a model pretrained without them)")
    args = parser.parse_args(argv)
    closing_check(Path(args.model) if args.model else builtin_path(), Path(args.out), args.n, torch.device(args.device),
                  held_out=args.held_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
