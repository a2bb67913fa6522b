"""Training examples as the loop sees them: latents + conditioning for any global sample position.

A position p (0, 1, 2, ... over the whole run) maps to epoch p // N and a slot in that epoch's seeded
permutation, so any process or micro-batch can fetch its share without a stateful data loader, and a
resumed run sees exactly the examples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import conditioning
from .conditioning import Conditioning
from .config import DataConfig, TrainConfig
from .class_images import class_prompt
from .data import ImageRecord, SubjectDataset, generator_for, load_image_folder
from .errors import SdtuneError
from .loss import sample_seed


@dataclass
class Batch:
    latents: torch.Tensor
    conditioning: Conditioning
    is_class: torch.Tensor
    noise_positions: list[int]


class ExampleStream:
    """One dataset (instance or class images) addressed by global position."""

    def __init__(self, dataset: SubjectDataset, seed: int, batch_size: int):
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self._order = lru_cache(maxsize=4)(self._epoch_order)

    def slot(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) for a global position."""
        order = self._order(position // len(self.dataset)) if len(self.dataset) else []
        return position // len(self.dataset), order[position % len(self.dataset)]

    def _epoch_order(self, epoch: int) -> list[int]:
        """A seeded permutation; with buckets, grouped so each micro-batch holds one image size."""
        count = len(self.dataset)
        perm = torch.randperm(count, generator=generator_for(self.seed, epoch)).tolist()
        keys = self.dataset.bucket_keys()
        if len(set(keys)) == 1 or self.batch_size == 1:
            return perm
        groups: dict = {}
        for index in perm:
            groups.setdefault(keys[index], []).append(index)
        chunks = []
        for members in groups.values():
            while len(members) % self.batch_size:  # pad a short bucket by repeating its own images
                members.append(members[len(members) % len(members)])
            chunks += [members[i: i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        chunk_order = torch.randperm(len(chunks), generator=generator_for(self.seed, epoch, 1)).tolist()
        flat = [i for c in chunk_order for i in chunks[c]]
        return flat[:count] if len(flat) >= count else flat + perm[: count - len(flat)]


class TrainingSet:
    """Latents (cached when deterministic) and text conditioning (cached when the encoder is frozen)."""

    def __init__(self, model, instance: ExampleStream, class_: ExampleStream | None, seed: int, device,
                 cache_latents: bool, instance_prompt: str, templates: list[str] | None = None):
        self.model, self.instance, self.class_ = model, instance, class_
        self.seed, self.device = seed, device
        self.instance_prompt = instance_prompt
        self.templates = templates
        self._latent_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._cache_latents = cache_latents
        self._cond_cache: dict[str, Conditioning] = {}

    @property
    def text_trains(self) -> bool:
        """Whether text conditioning must be recomputed (it can start being cached once a text encoder
        stops training part-way through a run)."""
        return any(p.requires_grad for e in self.model.text_encoders for p in e.parameters())

    @property
    def static_shapes(self) -> bool:
        """Whether every batch has the same tensor shapes (one image size), so a captured graph can replay it."""
        streams = [self.instance] + ([self.class_] if self.class_ is not None else [])
        return len({key for stream in streams for key in stream.dataset.bucket_keys()}) == 1

    def fill_caches(self, chunk: int = 16) -> None:
        """Encode every cached image and prompt now rather than at first use, so every step costs the same
        (cached latents are seeded by image, not by when they are made: the values do not change)."""
        streams = [(self.instance, False)] + ([(self.class_, True)] if self.class_ is not None else [])
        if self._cache_latents:
            for stream, is_class in streams:
                for position in range(len(stream.dataset)):  # one epoch shows every image
                    self._latents(stream, position, 2 * position + int(is_class), is_class)
        if not self.text_trains:
            prompts = list(dict.fromkeys((self.templates or []) + [p for s, _ in streams for p in s.dataset.prompts]))
            for start in range(0, len(prompts), chunk):
                self._conditioning(prompts[start: start + chunk])

    def idle_components(self) -> list[str]:
        """Model components the steps never call once the caches are full (after fill_caches)."""
        idle = ["vae"] if self._cache_latents else []
        if not self.text_trains:
            idle += [name for name in self.model.components() if name.startswith("text_encoder")]
        return idle

    def batch(self, positions: list[int]) -> Batch:
        items = [(self.instance, p, 2 * p, False) for p in positions]
        if self.class_ is not None:
            items += [(self.class_, p, 2 * p + 1, True) for p in positions]
        latents = torch.cat([self._latents(stream, p, noise_pos, is_class) for stream, p, noise_pos, is_class in items])
        prompts = [self._prompt(stream, p) for stream, p, _, _ in items]
        return Batch(latents, self._conditioning(prompts), torch.tensor([it[3] for it in items]),
                     [it[2] for it in items])

    def _prompt(self, stream: ExampleStream, position: int) -> str:
        _, index = stream.slot(position)
        record = index % len(stream.dataset.records)
        if self.templates and stream is self.instance:
            # Methods with template lists (Textual Inversion) vary the wording per sample, seeded.
            pick = sample_seed(self.seed + 13, position) % len(self.templates)
            return self.templates[pick]
        return stream.dataset.prompts[record]

    @torch.no_grad()
    def _latents(self, stream: ExampleStream, position: int, noise_pos: int, is_class: bool) -> torch.Tensor:
        epoch, index = stream.slot(position)
        image = index % len(stream.dataset.records)  # repeats show the same image
        key = (int(is_class), image)
        if self._cache_latents and key in self._latent_cache:
            return self._latent_cache[key]
        stream.dataset.set_epoch(epoch)
        pixels = stream.dataset.get(index)["pixels"].unsqueeze(0).to(self.device, torch.float32)
        vae = self.model.vae
        dist = vae.encode(pixels).latent_dist
        # The posterior sample's noise is seeded by the image when cached, by the position otherwise.
        seed_key = (image * 2 + int(is_class)) if self._cache_latents else noise_pos
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(
            sample_seed(self.seed + 7, seed_key))).to(self.device)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
        if self._cache_latents:
            self._latent_cache[key] = latents
        return latents

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        if self.text_trains:
            return conditioning.encode(self.model, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            with torch.no_grad():
                encoded = conditioning.encode(self.model, missing)
            for i, prompt in enumerate(missing):
                self._cond_cache[prompt] = encoded.select(slice(i, i + 1))
        return Conditioning.cat([self._cond_cache[p] for p in prompts])


def build_training_set(model, data_cfg: DataConfig, train_cfg: TrainConfig, accelerator,
                       templates: list[str] | None = None,
                       class_records: list[ImageRecord] | None = None, prompt_token: str = "") -> TrainingSet:
    """Load the subject (and class) images and wrap them for the loop; `templates` (with {token} and
    {class_word}) replace the single instance template unless the user gave captions or a template.
    With prior preservation the class images are `class_records` (see class_images.prepare) or, when not
    given, the --class-images folder as it is; each is trained with its own caption (the prompt it was
    generated from, or its .txt), else the class prompt. `prompt_token` (default: the data's token) is what
    {token} becomes in the instance prompts (Method.prompt_token)."""
    if not data_cfg.images:
        raise SdtuneError("No image folder given: pass --images DIR with the subject's pictures.")
    resolution = data_cfg.resolution or model.resolution
    template = data_cfg.prompt_template or default_template(model)

    def dataset(records: list[ImageRecord], token: str, use_captions: bool) -> SubjectDataset:
        return SubjectDataset(records, token, data_cfg.class_word, template=template,
                              use_captions=use_captions, resolution=resolution,
                              random_crop=not data_cfg.center_crop, flip=data_cfg.flip,
                              repeats=data_cfg.repeats, buckets=data_cfg.buckets, seed=train_cfg.seed)

    token = prompt_token or data_cfg.token
    instance = dataset(load_image_folder(data_cfg.images), token, data_cfg.use_captions)
    class_stream = None
    if train_cfg.prior_preservation:
        if class_records is None:
            if not data_cfg.class_images or not data_cfg.class_word:
                raise SdtuneError("Prior preservation needs --class-word and --class-images DIR.")
            class_records = load_image_folder(data_cfg.class_images)
        class_set = dataset(class_records, "", False)
        default = class_prompt(model, data_cfg)
        class_set.prompts = [record.caption or default for record in class_set.records]
        class_stream = ExampleStream(class_set, train_cfg.seed + 1, train_cfg.batch_size)
    cache = train_cfg.cache_latents and not instance.augmentation_is_random
    filled = None
    if templates and not data_cfg.prompt_template and not data_cfg.use_captions:
        filled = [t.replace("{token}", token).replace("{class_word}", data_cfg.class_word) for t in templates]
    prompt = filled[0] if filled else instance.prompts[0]
    return TrainingSet(model, ExampleStream(instance, train_cfg.seed, train_cfg.batch_size), class_stream,
                       train_cfg.seed, accelerator.device, cache, prompt, filled)


def default_template(model) -> str:
    """The base model's instance-prompt template: its own if it declares one (the builtin model does)."""
    return model.extras.get("prompt_template", "a photo of {token} {class_word}")
