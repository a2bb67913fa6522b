"""Subject and class images for training: loading, captions, resize/crop/flip, aspect buckets, latent cache.

Awkward images (CMYK, 16-bit, palette, alpha, EXIF-rotated) become RGB; unreadable ones are refused by name before
training starts. All randomness comes from an explicit seed or `torch.Generator`, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from sdtune.errors import SdtuneError
from sdtune.scan import is_regular_file, regular_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 8
MAX_SIDE = 16384
DEFAULT_TEMPLATE = "{token} {class_word}"
Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ImageRecord:
    """One validated image file: its path, upright size (after EXIF rotation) and optional .txt caption."""

    path: Path
    width: int
    height: int
    caption: str | None = None

    def load(self) -> Image.Image:
        """Decode the file again as upright RGB (records hold no pixels, so big folders stay cheap)."""
        return load_image(self.path)


def _refuse(path: Path, why: str) -> SdtuneError:
    """The one-sentence refusal for an image file that cannot be decoded."""
    return SdtuneError(f"{path} is not a readable image ({why}): remove or replace it.")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited onto white, 16/32-bit greyscale is scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        arr = np.asarray(img).astype(np.float64)
        top = arr.max(initial=0)
        if mode == "F":
            arr = arr * 255.0 if top <= 1.0 else arr
        elif mode.startswith("I;16") or top > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and validate one image; returns it upright and RGB or raises SdtuneError naming it."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise _refuse(path, "empty file")
        with Image.open(path) as img:
            w, h = img.size
            if max(w, h) > MAX_SIDE:
                raise SdtuneError(f"{path} is {w}x{h} pixels, over the {MAX_SIDE} px side limit: downscale it.")
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img))
            rgb.load()
    except SdtuneError:
        raise
    except Image.DecompressionBombError:
        raise SdtuneError(f"{path} is too large to decode safely (decompression-bomb limit): downscale or remove it.")
    except UnidentifiedImageError:
        raise _refuse(path, "not an image file, or its header is damaged") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # permissions, vanished file: not the image's fault
            raise SdtuneError(f"{path} cannot be read ({exc.strerror}): check that it exists and is readable.") from None
        why = "truncated file" if "truncat" in str(exc).lower() else f"corrupt file: {exc}"
        raise _refuse(path, why) from None
    if min(rgb.size) < MIN_SIDE:
        raise SdtuneError(f"{path} is only {rgb.width}x{rgb.height} pixels (minimum {MIN_SIDE}): use a larger image.")
    return rgb


def read_caption(image_path: Path) -> str | None:
    """The stripped UTF-8 text of the same-stem .txt file, or None when absent or empty."""
    txt = image_path.with_suffix(".txt")
    if not is_regular_file(txt):  # a FIFO named x.txt would block the read
        return None
    limit = 64 * 1024  # a caption is a sentence or two; checked before reading, so a huge file is never loaded
    if txt.stat().st_size > limit:
        raise SdtuneError(f"caption {txt} is larger than {limit // 1024} KB: shorten it to the image's description.")
    try:
        text = txt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise SdtuneError(f"caption {txt} is not UTF-8 text: re-save it as UTF-8.") from None
    return text or None


def load_image_folder(path: str | Path) -> list[ImageRecord]:
    """Validate every png/jpg/jpeg/webp in a folder (sorted by name) and read same-stem .txt captions.

    Other files, hidden files and special files (FIFOs, devices) are skipped; any unreadable, tiny or huge
    image is refused by name.
    """
    folder = Path(path)
    if not folder.exists():
        raise SdtuneError(f"image folder {folder} does not exist: check the path.")
    if not folder.is_dir():
        raise SdtuneError(f"{folder} is a file, not a folder: pass the folder that holds the images.")
    files = regular_files(folder, IMAGE_EXTENSIONS, recursive=False)
    if not files:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise SdtuneError(f"image folder {folder} holds no images ({exts}): add some or point to another folder.")
    return [ImageRecord(f, *load_image(f).size, read_caption(f)) for f in files]


def build_prompt(
    record: ImageRecord, token: str, class_word: str, template: str = DEFAULT_TEMPLATE, use_captions: bool = True
) -> str:
    """The training prompt for one image: its .txt caption when `use_captions`, else the template.

    `{token}` and `{class_word}` are substituted in both (plain replacement, so other braces are harmless).
    """
    text = record.caption if use_captions and record.caption else template
    return text.replace("{token}", token).replace("{class_word}", class_word)


def generator_for(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *keys) so each (epoch, item) draws independent, repeatable numbers."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *(k & 0xFFFFFFFF for k in keys)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def resize_to_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (Lanczos) so the image covers width x height with the aspect ratio kept; for square targets the
    shorter side becomes the resolution."""
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def crop_and_flip(img: Image.Image, width: int, height: int, random_crop: bool = False, flip: bool = False,
                  generator: torch.Generator | None = None) -> Image.Image:
    """Crop a covering image to width x height (centre, or random from `generator`) and maybe mirror it (p=0.5)."""
    if (random_crop or flip) and generator is None:
        raise ValueError("random crop/flip needs an explicit torch.Generator")
    dx, dy = img.width - width, img.height - height
    if random_crop:
        left = int(torch.randint(0, dx + 1, (1,), generator=generator))
        top = int(torch.randint(0, dy + 1, (1,), generator=generator))
    else:
        left, top = dx // 2, dy // 2
    out = img.crop((left, top, left + width, top + height))
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def transform_image(img: Image.Image, resolution: int | Size, random_crop: bool = False, flip: bool = False,
                    generator: torch.Generator | None = None) -> Tensor:
    """Resize + crop to `resolution` (an int for a square, or (width, height)), maybe flip, return [3,H,W] in [-1,1]."""
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    return to_tensor(crop_and_flip(resize_to_cover(img, w, h), w, h, random_crop, flip, generator))


def make_buckets(resolution: int, step: int = 8, min_ratio: float = 0.5, max_ratio: float = 2.0) -> list[Size]:
    """(width, height) buckets, both multiples of `step`, area <= resolution², aspect w/h within [min, max].

    The square (resolution rounded down to `step`) is always included; the list is sorted by aspect ratio.
    """
    if step <= 0 or resolution < step:
        raise SdtuneError(f"bucket step {step} must be positive and at most the resolution {resolution}: lower it.")
    area = resolution * resolution
    side = resolution // step * step
    buckets = {(side, side)}
    w = step
    while w <= resolution * math.sqrt(max_ratio) + step:
        h = (area // w) // step * step
        if h >= step and min_ratio <= w / h <= max_ratio:
            buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest (in log space) to width/height; larger area breaks ties."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


class SubjectDataset(Dataset):
    """Training examples {"pixels": [3,H,W] in [-1,1], "prompt": str, "index": image index} from image records.

    Length is len(records) * repeats; item i shows image i % len(records). Random crop/flip draw from a
    generator seeded by (seed, epoch, i): call `set_epoch` each epoch for new augmentations.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord], token: str = "", class_word: str = "", *,
        template: str = DEFAULT_TEMPLATE, use_captions: bool = True, resolution: int = 512,
        random_crop: bool = False, flip: bool = False, repeats: int = 1,
        buckets: bool = False, bucket_step: int = 8, seed: int = 0,
    ) -> None:  # fmt: skip
        if not records:
            raise SdtuneError("the image list is empty: point the dataset at a folder that holds images.")
        if repeats < 1:
            raise SdtuneError(f"repeats is {repeats}, but each image must appear at least once: use 1 or more.")
        if resolution < MIN_SIDE:
            raise SdtuneError(f"resolution {resolution} is below {MIN_SIDE} px: use a larger --resolution.")
        self.records = list(records)
        self.prompts = [build_prompt(r, token, class_word, template, use_captions) for r in self.records]
        self.resolution, self.random_crop, self.flip = resolution, random_crop, flip
        self.repeats, self.seed, self.epoch = repeats, seed, 0
        if buckets:
            table = make_buckets(resolution, bucket_step)
            self.sizes = [assign_bucket(r.width, r.height, table) for r in self.records]
        else:
            self.sizes = [(resolution, resolution)] * len(self.records)
        self._resized: dict[tuple[int, int, int], Image.Image] = {}

    @property
    def augmentation_is_random(self) -> bool:
        """True when items differ between epochs (random crop or flip), so latents must not be cached."""
        return self.random_crop or self.flip

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def bucket_keys(self) -> list[Size]:
        """The (width, height) each item will have, for BucketBatchSampler."""
        return [self.sizes[i % len(self.records)] for i in range(len(self))]

    def get(self, i: int, size: Size | None = None) -> dict:
        """Item i, optionally at an explicit (width, height) instead of its own bucket (used for class pairing)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        n = i % len(self.records)
        w, h = size or self.sizes[n]
        if (n, w, h) not in self._resized:  # decode + resize once; crops and flips are cheap per epoch
            self._resized[n, w, h] = resize_to_cover(self.records[n].load(), w, h)
        gen = generator_for(self.seed, self.epoch, i) if self.augmentation_is_random else None
        img = crop_and_flip(self._resized[n, w, h], w, h, self.random_crop, self.flip, gen)
        return {"pixels": to_tensor(img), "prompt": self.prompts[n], "index": n}

    def __getitem__(self, i: int) -> dict:
        return self.get(i)
