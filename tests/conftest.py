"""Shared fixtures: tiny subject image folders and tiny saved pipelines (no network, no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes (make test): one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

import pytest
from PIL import Image, ImageDraw


def make_subject_images(folder, count: int = 4, size: int = 32):
    """A recognisable toy subject: a yellow square with a red dot, on varying backgrounds."""
    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = [(20, 40, 160), (30, 140, 40), (120, 120, 120), (200, 200, 240), (60, 20, 80)]
    for i in range(count):
        image = Image.new("RGB", (size, size), backgrounds[i % len(backgrounds)])
        draw = ImageDraw.Draw(image)
        off = (i % 3) * 2
        draw.rectangle([6 + off, 6, 24 + off, 24], fill=(240, 210, 30))
        draw.ellipse([12 + off, 12, 18 + off, 18], fill=(220, 30, 30))
        image.save(folder / f"subject_{i}.png")
    return folder


@pytest.fixture
def subject_dir(tmp_path):
    return make_subject_images(tmp_path / "subject")


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """tiny:sd1 / tiny:sd2 / tiny:sdxl saved as ordinary diffusers folders (for interop with diffusers)."""
    from sdtune.model import load

    root = tmp_path_factory.mktemp("pipelines")
    dirs = {}
    for family in ("sd1", "sd2", "sdxl"):
        path = root / family
        load(f"tiny:{family}").pipeline().save_pretrained(path)
        dirs[family] = path
    return dirs
