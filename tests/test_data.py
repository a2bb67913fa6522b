"""Subject image loading, prompts, transforms, buckets, repeats, latent caching and class pairing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data import (
    ImageRecord,
    SubjectDataset,
    assign_bucket,
    build_prompt,
    generator_for,
    load_image_folder,
    make_buckets,
    transform_image,
)
from sdtune.errors import SdtuneError


def _half_red_blue(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue: orientation and flips are visible."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def _one(folder: Path):
    (rec,) = load_image_folder(folder)
    return rec, rec.load()


# ------------------------------------------------------------------ loading


def test_cmyk_jpeg_loads_as_rgb(tmp_path) -> None:
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    rec, img = _one(tmp_path)
    assert img.mode == "RGB" and img.size == (32, 24) and (rec.width, rec.height) == (32, 24)
    r, g, b = img.getpixel((16, 12))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path) -> None:
    arr = np.full((16, 24), 32768, np.uint16)
    arr[:, :12] = 65535
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really 16-bit on disk
    _, img = _one(tmp_path)
    px = np.asarray(img)
    assert img.mode == "RGB" and img.size == (24, 16)
    assert tuple(px[0, 0]) == (255, 255, 255)
    assert tuple(px[0, 20]) == (128, 128, 128)


def test_palette_png_transparency_composites_on_white(tmp_path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (0, 0, 8, 16))
    img.save(tmp_path / "pal.png", transparency=0)
    _, out = _one(tmp_path)
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (0, 200, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_on_white(tmp_path, mode: str) -> None:
    img = Image.new(mode, (12, 12), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    img.paste((0, 0, 0, 255) if mode == "RGBA" else (0, 255), (0, 0, 6, 12))
    img.save(tmp_path / "a.png")
    _, out = _one(tmp_path)
    assert out.getpixel((1, 1)) == (0, 0, 0) and out.getpixel((10, 1)) == (255, 255, 255)


def test_greyscale_becomes_rgb(tmp_path) -> None:
    Image.new("L", (10, 10), 77).save(tmp_path / "g.webp", lossless=True)
    _, out = _one(tmp_path)
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (77, 77, 77)


def test_exif_rotation_is_applied(tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    _half_red_blue(40, 20).save(tmp_path / "rot.JPG", exif=exif, quality=95)
    rec, img = _one(tmp_path)
    assert img.size == (20, 40) and (rec.width, rec.height) == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_zero_byte_truncated_and_fake_images_refused_by_name(tmp_path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    _half_red_blue().save(good / "a.png")
    data = (good / "a.png").read_bytes()
    for name, content, why in [
        ("empty.png", b"", "empty"),
        ("photo3.png", data[: len(data) // 2], "truncated"),
        ("notes.jpg", b"these are my notes, not a picture\n", "not an image"),
    ]:
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        _half_red_blue().save(folder / "fine.png")
        (folder / name).write_bytes(content)
        with pytest.raises(SdtuneError) as err:
            load_image_folder(folder)
        assert name in str(err.value) and why in str(err.value)


def test_size_limits(tmp_path, monkeypatch) -> None:
    for name, size in [("tiny.png", (4, 20)), ("wide.png", (20000, 8))]:
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        Image.new("L", size).save(folder / name)
        with pytest.raises(SdtuneError, match=name):
            load_image_folder(folder)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("RGB", (100, 100)).save(bomb / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SdtuneError, match="bomb.png.*decompression"):
        load_image_folder(bomb)


def test_folder_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(SdtuneError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(SdtuneError, match="is a file"):
        load_image_folder(tmp_path / "f.png")
    empty = tmp_path / "only_text"
    empty.mkdir()
    (empty / "a.txt").write_text("caption")
    with pytest.raises(SdtuneError, match="only_text.*no images"):
        load_image_folder(empty)


def test_skips_non_images_sorts_and_reads_captions(tmp_path) -> None:
    for name in ["b.png", "a.JPEG", "c.webp"]:
        _half_red_blue().save(tmp_path / name)
    (tmp_path / "a.txt").write_text("\ufeff  a {token} toy on grass \n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("   ", encoding="utf-8")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "._b.png").write_bytes(b"\x00\x05junk")
    (tmp_path / "sub.png").mkdir()
    recs = load_image_folder(tmp_path)
    assert [r.path.name for r in recs] == ["a.JPEG", "b.png", "c.webp"]
    assert [r.caption for r in recs] == ["a {token} toy on grass", None, None]


def test_build_prompt_template_and_caption_override() -> None:
    plain = ImageRecord(Path("x.png"), 8, 8)
    captioned = ImageRecord(Path("y.png"), 8, 8, "a {token} on the {class_word} mat")
    assert build_prompt(plain, "sks", "dog") == "sks dog"
    assert build_prompt(plain, "sks", "dog", "a photo of {token} {class_word}") == "a photo of sks dog"
    assert build_prompt(captioned, "sks", "dog") == "a sks on the dog mat"
    assert build_prompt(captioned, "sks", "dog", use_captions=False) == "sks dog"
    assert build_prompt(plain, "sks", "dog", "shape {token} {x}") == "shape sks {x}"


# ------------------------------------------------------------------ transforms


def test_center_crop_resize_range_and_orientation() -> None:
    t = transform_image(_half_red_blue(80, 40), 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, 8, 2] > 0.9 and t[2, 8, 2] < -0.9  # centre crop keeps red on the left
    assert t[2, 8, 13] > 0.9 and t[0, 8, 13] < -0.9
    wide = transform_image(_half_red_blue(80, 40), (24, 8))
    assert wide.shape == (3, 8, 24) and torch.equal(wide, transform_image(_half_red_blue(80, 40), (24, 8)))


def test_random_crop_and_flip_are_seeded() -> None:
    arr = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr)

    def run(seed: int) -> torch.Tensor:
        return transform_image(img, 32, random_crop=True, flip=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    outs = {run(s).numpy().tobytes() for s in range(8)}
    assert len(outs) > 1
    with pytest.raises(ValueError):
        transform_image(img, 32, flip=True)
    flips = [transform_image(_half_red_blue(), (20, 20), flip=True, generator=generator_for(0, s)) for s in range(20)]
    flipped = [bool(f[2, 10, 1] > 0) for f in flips]  # blue on the left means mirrored
    assert 0 < sum(flipped) < 20


# ------------------------------------------------------------------ buckets


def test_make_buckets_respects_constraints() -> None:
    buckets = make_buckets(64, step=8)
    assert (64, 64) in buckets
    for w, h in buckets:
        assert w % 8 == 0 and h % 8 == 0
        assert 0.5 <= w / h <= 2.0
        assert w * h <= 64 * 64 and w * h >= 0.75 * 64 * 64
    assert max(w / h for w, h in buckets) > 1.6 and min(w / h for w, h in buckets) < 0.625
    big = make_buckets(512, step=64)
    assert (512, 512) in big and 1.5 < max(w / h for w, h in big) <= 2.0 and all(w * h <= 512 * 512 for w, h in big)
    assert make_buckets(64, step=64) == [(64, 64)]
    assert assign_bucket(300, 100, buckets) == max(buckets, key=lambda b: b[0] / b[1])
    assert assign_bucket(100, 100, buckets) == (64, 64)
    w, h = assign_bucket(160, 90, buckets)
    assert abs(w / h - 16 / 9) < 0.15


def _bucket_folder(tmp_path: Path) -> Path:
    sizes = [(64, 64), (128, 64), (64, 128), (130, 66), (70, 70), (66, 130), (120, 60)]
    for i, size in enumerate(sizes):
        _half_red_blue(*size).save(tmp_path / f"img{i}.png")
    return tmp_path


def test_bucket_dataset_and_sampler(tmp_path) -> None:
    recs = load_image_folder(_bucket_folder(tmp_path))
    ds = SubjectDataset(recs, "sks", "toy", resolution=32, buckets=True, repeats=2, seed=3)
    keys = ds.bucket_keys()
    assert len(keys) == 14 and len(set(keys)) == 3
    for i in range(len(ds)):
        w, h = keys[i]
        assert ds[i]["pixels"].shape == (3, h, w)
        rec = recs[i % 7]
        assert (w / h > 1) == (rec.width > rec.height) and (w == h) == (rec.width == rec.height)
    from sdtune.trainset import ExampleStream

    stream = ExampleStream(ds, seed=5, batch_size=3)
    for epoch in range(2):
        order = [stream.slot(epoch * len(ds) + p)[1] for p in range(len(ds))]
        assert len(order) == len(ds) and len(set(order)) >= len(ds) - 2 * 3  # short buckets are padded
        micro_batches = [order[i: i + 3] for i in range(0, len(order) - len(order) % 3, 3)]
        assert all(len({keys[i] for i in b}) == 1 for b in micro_batches), "a micro-batch mixes image sizes"


# ------------------------------------------------------------------ dataset, repeats, caching, pairing


def test_dataset_items_repeats_and_epochs(tmp_path) -> None:
    for i in range(3):
        _half_red_blue(48, 40).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("{token} close-up")
    recs = load_image_folder(tmp_path)
    ds = SubjectDataset(recs, "sks", "toy", template="a {token} {class_word}", resolution=16, repeats=4)
    assert len(ds) == 12 and not ds.augmentation_is_random
    assert [ds[i]["index"] for i in range(12)] == [0, 1, 2] * 4
    assert [ds[i]["prompt"] for i in range(3)] == ["a sks toy", "sks close-up", "a sks toy"]
    assert torch.equal(ds[0]["pixels"], ds[3]["pixels"])
    with pytest.raises(IndexError):
        ds[12]
    aug = SubjectDataset(recs, "sks", "toy", resolution=16, random_crop=True, flip=True, seed=7)
    assert aug.augmentation_is_random
    first = [aug[i]["pixels"] for i in range(3)]
    again = SubjectDataset(recs, "sks", "toy", resolution=16, random_crop=True, flip=True, seed=7)
    assert all(torch.equal(a, again[i]["pixels"]) for i, a in enumerate(first))
    changed = False
    for epoch in range(1, 6):
        aug.set_epoch(epoch)
        changed |= any(not torch.equal(a, aug[i]["pixels"]) for i, a in enumerate(first))
    assert changed
    with pytest.raises(SdtuneError, match="repeats"):
        SubjectDataset(recs, repeats=0)
