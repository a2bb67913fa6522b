"""A benchmark subject as data: its look, instance images, evaluation prompts by type and scorer.

A subject declares its look (looks.Look), the contexts of its instance images, the backgrounds, positions,
size and classes those images never show, and its class-word prompts; the evaluation prompts of every type
follow from those by the rules below, in the caption grammar the builtin model was pretrained on:

- caption: the instance images' own captions (what training saw);
- identifier: the identifier alone ("a sks circle"), once per class the instance images show;
- one_factor: one thing the instance images never show, the rest of a training caption kept: a new
  background, or a new position, or a new size (only where size is not part of the look), as DreamBench's
  recontextualisation prompts change one thing at a time;
- two_factors: a new background and a new position at once (the hard column);
- held_out_class: for a style, classes its images never show, in the instance contexts;
- class: class-word prompts without the identifier (prior preservation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.toyworld.captions import caption, parse_caption
from sdtune.toyworld.looks import Look, LookReading, read_look
from sdtune.toyworld.world import COLOURS, POSITION_NAMES, Scene, render_batch, scenes_to_batch, to_pil

PROMPT_TYPES: tuple[str, ...] = ("caption", "identifier", "one_factor", "two_factors", "held_out_class", "class")
SUBJECT_TYPES = PROMPT_TYPES[:-1]  # the types whose prompts carry the identifier
HEADLINE_TYPE, HARD_TYPE = "one_factor", "two_factors"
KINDS: tuple[str, ...] = ("new look", "nameable look", "style")
NEW_SIZE_PROMPTS = 2  # one_factor prompts with the new size, in the first instance contexts
HELD_OUT_CONTEXTS = 2  # held_out_class prompts: each held-out class in the first instance contexts


@dataclass(frozen=True)
class Context:
    """Where one instance image shows the subject: the class (shape), background and position."""

    shape: str
    background: str
    position: str


@dataclass(frozen=True)
class Subject:
    """One builtin benchmark subject (see the module docstring); `identity` names the attributes the
    identifier stands for, which prompt fidelity leaves out."""

    name: str
    kind: str
    description: str
    token: str
    class_word: str
    look: Look
    instances: tuple[Context, ...]
    held_out_backgrounds: tuple[str, ...]
    held_out_positions: tuple[str, ...]
    class_prompts: tuple[str, ...]
    new_size: str | None = "small"
    held_out_shapes: tuple[str, ...] = ()

    @property
    def identity(self) -> tuple[str, ...]:
        """The attributes the identifier stands for: the colour always, shape and size where the look fixes them."""
        return ("colour",) + (("shape",) if self.look.shape else ()) + (("size",) if self.look.size else ())

    @property
    def instance_prompt(self) -> str:
        return caption(self.class_word, identifier=self.token)

    def instance_captions(self, token: str | None = None) -> list[str]:
        """Each instance image's caption (its class, position and background), with `token` as identifier."""
        word = token or self.token
        return [caption(c.shape, position=c.position, background=c.background, identifier=word)
                for c in self.instances]

    @functools.cached_property
    def prompts(self) -> dict[str, tuple[str, ...]]:
        """Evaluation prompts by type (types a subject has no prompt of are left out)."""
        n, word = len(self.instances), self.token
        ctx = lambda k: self.instances[k % n]  # noqa: E731
        one = [caption(ctx(k).shape, position=ctx(k).position, background=b, identifier=word)
               for k, b in enumerate(self.held_out_backgrounds)]
        one += [caption(ctx(k).shape, position=p, background=ctx(k).background, identifier=word)
                for k, p in enumerate(self.held_out_positions)]
        if self.new_size:
            one += [caption(ctx(k).shape, size=self.new_size, position=ctx(k).position,
                            background=ctx(k).background, identifier=word) for k in range(NEW_SIZE_PROMPTS)]
        pairs = [(b, p) for b in self.held_out_backgrounds for p in self.held_out_positions]
        two = [caption(ctx(k).shape, position=p, background=b, identifier=word) for k, (b, p) in enumerate(pairs)]
        shapes = list(dict.fromkeys(c.shape for c in self.instances))
        held = [caption(s, position=ctx(k).position, background=ctx(k).background, identifier=word)
                for s in self.held_out_shapes for k in range(HELD_OUT_CONTEXTS)]
        found = {"caption": tuple(self.instance_captions()),
                 "identifier": tuple(caption(s, identifier=word) for s in shapes),
                 "one_factor": tuple(one), "two_factors": tuple(two), "held_out_class": tuple(held),
                 "class": self.class_prompts}
        return {t: p for t, p in found.items() if p}

    def type_of(self, prompt: str) -> str:
        """The prompt type of one of the subject's evaluation prompts."""
        found = next((t for t, prompts in self.prompts.items() if prompt in prompts), None)
        if found is None:
            raise ValueError(f"{prompt!r} is none of {self.name}'s evaluation prompts")
        return found

    def described(self, prompt: str) -> str:
        """A subject prompt with the identifier replaced by the words for a plain look ("a sks triangle" -> "a
        small green triangle"): what the base model can draw without learning anything. A pattern has no words."""
        if self.look.colour2 is not None:
            raise ValueError(f"the look of {self.name} has a pattern, which no caption can name")
        asked = parse_caption(prompt)
        return caption(asked["shape"], self.look.colour, self.look.size or asked["size"], asked["position"],
                       asked["background"])

    def read(self, images) -> list[LookReading]:
        """The subject's scorer on images (0 = plain or absent, ~1 = the subject)."""
        return read_look(images, self.look)

    def instance_scenes(self, seed: int = 0) -> list[Scene]:
        """The instance scenes (fixed contexts, seeded jitter)."""
        rng = np.random.default_rng(seed)
        return [self.look.scene(c.shape, c.background, c.position, rng=rng) for c in self.instances]

    def instance_images(self, size: int = 32, seed: int = 0) -> list:
        """The instance images as PIL images."""
        return [to_pil(im) for im in render_batch(scenes_to_batch(self.instance_scenes(seed)), size)]

    def write_instance_images(self, folder: str | Path, size: int = 32, seed: int = 0, captions: bool = False,
                              token: str | None = None) -> list[Path]:
        """Write the instance images as TOKEN_00.png ... into folder (created), all or none; with captions=True
        also a same-named .txt holding each image's caption (identifier `token`, default the subject's).
        Returns the image paths."""
        from sdtune.artifacts import atomic_write_many

        writes = []
        texts = self.instance_captions(token)
        for i, img in enumerate(self.instance_images(size, seed)):
            path = Path(folder) / f"{self.token}_{i:02d}.png"
            writes.append((path, img.save))
            if captions:
                writes.append((path.with_suffix(".txt"), lambda tmp, text=texts[i]: tmp.write_text(text + "\n")))
        return [p for p in atomic_write_many(writes) if p.suffix == ".png"]

    def write_folder(self, folder: str | Path) -> list[Path]:
        """The instance images with captions in `folder`, for `sdtune subject`: refused where the folder holds
        files of its own (mixed into the subject they would be trained on); rewriting its own files is fine."""
        from sdtune.errors import SdtuneError
        from sdtune.outputs import check_folder_path

        folder = Path(folder)
        check_folder_path(folder, "Subject folder")
        names = {f"{self.token}_{i:02d}{suffix}" for i in range(len(self.instances)) for suffix in (".png", ".txt")}
        others = sorted(p.name for p in folder.iterdir() if p.name not in names) if folder.is_dir() else []
        if others:
            raise SdtuneError(f"{folder} already holds other files ({others[0]}, ...); choose an empty or new folder.")
        return self.write_instance_images(folder, captions=True)

    def renders(self, n: int, seed: int, backgrounds=None, positions=None, size: int = 32) -> torch.Tensor:
        """n jittered renders (uint8 [n,3,H,W]) on the instance classes, on the given backgrounds / positions
        (default: every background not in the look's colours, every position)."""
        rng = np.random.default_rng(seed)
        bgs = backgrounds or [c for c in COLOURS if c not in self.look.colours]
        poss = positions or list(POSITION_NAMES)
        shapes = list(dict.fromkeys(c.shape for c in self.instances))
        scenes = []
        for _ in range(n):
            bg, pos = bgs[rng.integers(len(bgs))], poss[rng.integers(len(poss))]
            shape = shapes[rng.integers(len(shapes))] if len(shapes) > 1 else shapes[0]
            scenes.append(self.look.scene(shape, bg, pos, rng=rng))
        return render_batch(scenes_to_batch(scenes), size)

    def prompt_renders(self, prompts: list[str], per_prompt: int, seed: int, size: int = 32) -> torch.Tensor:
        """What each subject prompt asks for, drawn as the subject (uint8 [len*per_prompt,3,H,W], prompt-major):
        the ceiling's images before the VAE. What a prompt leaves open comes from a random instance context."""
        rng = np.random.default_rng(seed)
        scenes = []
        for prompt in prompts:
            asked = parse_caption(prompt)
            for _ in range(per_prompt):
                ctx = self.instances[rng.integers(len(self.instances))]
                scenes.append(self.look.scene(asked["shape"], asked["background"] or ctx.background,
                                              asked["position"] or ctx.position, asked["size"] or "large", rng))
        return render_batch(scenes_to_batch(scenes), size)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 renders [N,3,H,W] encoded and decoded by `vae` (posterior mode): float [0,1] on the CPU."""
    from sdtune.toyworld.trainset import images_as_float

    weight = next(vae.parameters())
    z = vae.encode(images_as_float(images.to(weight.device)).to(weight.dtype)).latent_dist.mode()
    return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()
