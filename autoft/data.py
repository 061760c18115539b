"""Images in memory: decoded once per run, split, and augmented as tensors.

Dataset plugins return :class:`~autoft.specs.LabelledImages` (paths, PIL images or
arrays). :func:`load_data` decodes every image once, in a thread pool, to a square
uint8 tensor at the training size, and splits train/validation stratified and seeded.
Augmentation then runs per sample on batches, on the training device.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoft.errors import AutoftError
from autoft.specs import ImageSource, LabelledImages


@dataclass
class ImageTensors:
    """Decoded images, ``uint8`` in ``(N, 3, S, S)``, with ``int64`` labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageTensors":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageTensors(self.images[index], self.labels[index])

    @staticmethod
    def concat(parts: Sequence["ImageTensors"]) -> "ImageTensors":
        return ImageTensors(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class DataSplits:
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors | None
    classes: list[str]
    image_size: int
    hflip: bool = True
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------
# Decoding


def decode_image(source: ImageSource, size: int) -> torch.Tensor:
    """Decode one image to RGB, resize its shorter side to ``size`` and centre-crop a square."""
    from PIL import Image, ImageOps

    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            raise ValueError(f"arrays must be uint8, got {array.dtype}")
        image = Image.fromarray(array)
    elif isinstance(source, Image.Image):
        image = source
    else:
        image = Image.open(source)
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is big
        image = ImageOps.exif_transpose(image)
    image = image.convert("RGB")
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_all(
    samples: Sequence[ImageSource], size: int, workers: int | None = None
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode ``samples`` in parallel. Unreadable ones are skipped and reported, not fatal.

    Returns the stacked images, the indices of the samples that decoded, and the
    ``(source, reason)`` of those skipped.
    """

    def one(source: ImageSource) -> torch.Tensor | str:
        try:
            return decode_image(source, size)
        except Exception as exc:  # any undecodable file is a skip, whatever PIL raises
            return f"{type(exc).__name__}: {exc}"

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        results = list(pool.map(one, samples))
    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    skipped = [(str(samples[i]), r) for i, r in enumerate(results) if isinstance(r, str)]
    images = torch.stack([results[i] for i in kept]) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return images, kept, skipped


def warn_skipped(skipped: Sequence[tuple[str, str]], total: int) -> None:
    """One warning for all the images that could not be decoded, with a few examples."""
    if skipped:
        examples = "; ".join(f"{src} ({why})" for src, why in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {total}: {examples}{more}", stacklevel=3)


# ---------------------------------------------------------------------------
# Loading and splitting


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices for (keep, held out), stratified by label when every class allows it."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_held = max(int(round(len(labels) * fraction)), len(np.unique(labels)) if stratify is not None else 1)
    if n_held >= len(labels):
        raise AutoftError(f"too few images ({len(labels)}) to hold out a validation split")
    keep, held = train_test_split(index, test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def load_data(
    source: str,
    *,
    image_size: int | None = None,
    default_size: int = 224,
    val_fraction: float = 0.2,
    seed: int = 0,
    registry=None,
) -> DataSplits:
    """Load what the user typed through its dataset plugin, decode once and split."""
    from autoft import plugins

    registry = registry or plugins.registry()
    spec, argument = registry.dataset(source)
    labelled = spec.factory(argument)
    return prepare(labelled, image_size=image_size or labelled.image_size or default_size, val_fraction=val_fraction, seed=seed)


def prepare(labelled: LabelledImages, *, image_size: int, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    if len(labelled.samples) != len(labelled.labels):
        raise AutoftError("dataset returned a different number of samples and labels")
    if not labelled.samples:
        raise AutoftError("no images found")
    images, kept, skipped = decode_all(labelled.samples, image_size)
    warn_skipped(skipped, len(labelled.samples))
    if not kept:
        raise AutoftError("no readable images found")
    labels = np.asarray(labelled.labels, dtype=np.int64)[kept]
    present = np.unique(labels)
    if len(present) < 2:
        raise AutoftError(f"need at least two classes, found {len(present)} ({labelled.classes[present[0]]!r})")
    every = ImageTensors(images, torch.from_numpy(labels))
    splits = np.asarray(labelled.splits)[kept] if labelled.splits is not None else None

    test = None
    if splits is not None:
        train_idx = np.flatnonzero(splits == "train")
        val_idx = np.flatnonzero(splits == "val")
        test_idx = np.flatnonzero(splits == "test")
        if len(train_idx) == 0:
            raise AutoftError("the pre-split dataset has no training images")
        if len(val_idx) == 0:  # carve validation out of train; the test split is never touched
            keep, held = stratified_split(labels[train_idx], val_fraction, seed)
            train_idx, val_idx = train_idx[keep], train_idx[held]
        test = every.subset(test_idx) if len(test_idx) else None
    else:
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return DataSplits(
        train=every.subset(train_idx),
        val=every.subset(val_idx),
        test=test,
        classes=list(labelled.classes),
        image_size=image_size,
        hflip=labelled.hflip,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------
# Augmentation and batching


def train_augmentation(image_size: int, hflip: bool = True, scale: tuple[float, float] = (0.5, 1.0)) -> torch.nn.Module:
    """Random resized crop and flip, per sample, on float batches in [0, 1] (kornia)."""
    import kornia.augmentation as K

    steps: list[torch.nn.Module] = [K.RandomResizedCrop((image_size, image_size), scale=scale)]
    if hflip:
        steps.append(K.RandomHorizontalFlip())
    return torch.nn.Sequential(*steps)


class Normalize(torch.nn.Module):
    """uint8 or [0, 1] pixels in, normalised floats out; also the first layer of exported models."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 batch -> float batch in [0, 1] on ``device`` (converted there, moved as bytes)."""
    return images.to(device, non_blocking=True).float().div_(255)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension PIL can open), sorted."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))
