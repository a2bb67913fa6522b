"""Check the builtin subjects before anything trains on them: per subject and prompt type, the floor (the
untouched base model, sampled as `sdtune compare` samples), the ceiling (the subject drawn as each prompt
asks, through the base model's VAE) and, for a nameable look, the base model given the plain words instead
of the identifier; then how well each scorer separates its subject's renders from plain objects of its
classes and from the other subjects.

`python -m sdtune.toyworld.subject_check [--subjects all] [--images-per-prompt 4] [--json FILE]`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sdtune.toyworld.catalogue import SUBJECTS, select_subjects
from sdtune.toyworld.metrics import by_prompt_type, bootstrap_mean
from sdtune.toyworld.subjects import Subject, vae_round_trip
from sdtune.toyworld.world import SHAPES, render_batch, sample_scenes

SAMPLE_STEPS, GUIDANCE = 20, 7.5  # the builtin compare profile's evaluation settings


def floor_and_ceiling(model, subject: Subject, per_prompt: int, seed: int = 0) -> dict:
    """{"floor": per type, "ceiling": per type, "plain_words": per type (nameable looks only)} of
    metrics.by_prompt_type's estimates as plain dicts."""
    from sdtune.compare.sampling import sample

    prompts = [p for kind, ps in subject.prompts.items() for p in ps]
    images, index = sample(model, prompts, per_prompt, seed, SAMPLE_STEPS, GUIDANCE)
    asked = [prompts[i] for i in index]
    out = {"floor": _plain(by_prompt_type(images, asked, subject))}
    subject_prompts = [p for p in prompts if subject.type_of(p) != "class"]
    renders = vae_round_trip(model.vae, subject.prompt_renders(subject_prompts, per_prompt, seed))
    out["ceiling"] = _plain(by_prompt_type(renders, np.repeat(subject_prompts, per_prompt).tolist(), subject))
    if subject.look.colour2 is None:
        described = [subject.described(p) for p in subject_prompts]
        images, index = sample(model, described, per_prompt, seed, SAMPLE_STEPS, GUIDANCE)
        kinds = np.array([subject.type_of(subject_prompts[i]) for i in index])
        scores = np.array([r.score for r in subject.read(images)])
        out["plain_words"] = {kind: {"subject_fidelity": _dict(bootstrap_mean(scores[kinds == kind]))}
                              for kind in dict.fromkeys(kinds)}
    return out


def separation(model, subject: Subject, n: int = 200, seed: int = 11) -> dict[str, float]:
    """Mean score of the subject's scorer on its own renders (raw and through the VAE), on plain objects of
    its classes (and held-out classes) through the VAE, and on every other subject's renders through it."""
    def mean_score(images) -> float:
        return round(float(np.mean([r.score for r in subject.read(images)])), 3)

    own = subject.renders(n, seed)
    plain = sample_scenes(n, seed + 1)
    shapes = list(dict.fromkeys([c.shape for c in subject.instances] + list(subject.held_out_shapes)))
    plain.shape[:] = [SHAPES.index(shapes[i % len(shapes)]) for i in range(n)]
    out = {"own": mean_score(own), "own_vae": mean_score(vae_round_trip(model.vae, own)),
           "plain_class_vae": mean_score(vae_round_trip(model.vae, render_batch(plain)))}
    for other in SUBJECTS.values():
        if other is not subject:
            out[f"vae:{other.name}"] = mean_score(vae_round_trip(model.vae, other.renders(n, seed)))
    return out


def _dict(est) -> dict:
    return {"value": round(est.value, 3), "low": round(est.low, 3), "high": round(est.high, 3), "n": est.n}


def _plain(by_type: dict) -> dict:
    return {kind: {key: _dict(est) for key, est in metrics.items()} for kind, metrics in by_type.items()}


def table(results: dict) -> str:
    """The check as markdown: one line per subject and prompt type."""
    lines = ["| subject | type | floor | ceiling | plain words |", "|---|---|---|---|---|"]
    for name, found in results.items():
        for kind, metrics in found["floor"].items():
            key = "prior_preservation" if kind == "class" else "subject_fidelity"
            cells = [found.get(part, {}).get(kind, {}).get(key) for part in ("floor", "ceiling", "plain_words")]
            lines.append(f"| {name} | {kind} ({key.replace('_', ' ')}) | "
                         + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "| subject | scorer on: | mean score |", "|---|---|---|"]
    for name, found in results.items():
        lines += [f"| {name} | {what} | {value:.3f} |" for what, value in found["separation"].items()]
    return "\n".join(lines)


def _cell(est: dict | None) -> str:
    return "–" if not est else f"{est['value']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    from sdtune.model import load

    parser = argparse.ArgumentParser(prog="python -m sdtune.toyworld.subject_check", description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", default="all", help="comma list of builtin subjects, or all")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    model = load("builtin")
    results = {}
    for subject in select_subjects(args.subjects):
        results[subject.name] = {**floor_and_ceiling(model, subject, args.images_per_prompt),
                                 "separation": separation(model, subject)}
        print(f"checked {subject.name}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
