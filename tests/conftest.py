"""Shared fixtures: small generated image folders and digits decoded once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 24) -> Path:
    """A noisy square of one dominant colour: easy to tell apart, cheap to decode."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """autoft's cache (decoded images, pretraining) in a folder of this test session, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("autoft-cache")
        patch.setenv("AUTOFT_CACHE_DIR", str(root))
        yield root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """DIR/<class>/*.png with three colour classes, 8 images each."""
    root = tmp_path / "colours"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / name / f"{i}.png", colour, seed=100 * c + i)
    return root


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """DIR/{train,val,test}/<class>/*.png."""
    root = tmp_path / "split"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                make_image(root / split / name / f"{i}.png", colour, seed=hash((split, c, i)) % 10_000)
    return root


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits, decoded once at 32px and split (seed 0)."""
    from autoft.data import load_data

    return load_data("sample:digits", image_size=32, seed=0)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A test_resnet trained briefly on digits at 32px: a run folder with model.pt (export, predict, serve)."""
    from autoft.training import train

    out = tmp_path_factory.mktemp("digits_run")
    train("test_resnet", "sample:digits", out, epochs=2, batch_size=64, lr=3e-3, freeze_depth=0, image_size=32, device="cpu")
    return out


@pytest.fixture(scope="session")
def digits_onnx(digits_run: Path, tmp_path_factory) -> Path:
    """``digits_run`` exported to fp32 ONNX with a Triton repository: the export folder."""
    from autoft.exporting import export

    out = tmp_path_factory.mktemp("digits_onnx")
    export(digits_run, out, triton=True)
    return out
