"""Images decoded once, cached on disk, split, and augmented as tensors.

Dataset plugins return :class:`~autoft.specs.LabelledImages` (paths, PIL images or
arrays). :func:`prepare` decodes every image once, in a thread pool, to a square uint8
tensor at the training size, keeps the result in autoft's decoded-image cache (see
:mod:`autoft.data.cache`) so that the next command on the same images skips decoding, and
splits train/validation stratified and seeded. A dataset whose decoded size is within
:func:`in_memory_limit` is then held in memory; a larger one stays on disk and is read a
batch at a time (:meth:`ImageTensors.iter_batches`, prefetched in a background thread).
Augmentation runs per sample on batches, on the training device.

Folders follow one rule everywhere (class folders for ``search``/``train``, folders given to
``predict``): every image file in the folder *and its subfolders* counts, so
``imgs/<class>/album/x.jpg`` belongs to ``<class>``. Hidden files and folders (a leading
``.``) and files that are not images (by extension) are left out, and one warning says
what was left out and why.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from autoft.data import cache



UNLABELLED = -1  # the label of an image whose class is not known


class ImageTensors:
    """Decoded images, ``uint8`` in ``(N, 3, S, S)``, with ``int64`` labels (:data:`UNLABELLED` when not given).

    The images are a tensor in memory, or rows of a source read on demand: an
    :class:`~autoft.data.cache.ImageStore` (a set too big for memory), or sets joined by
    :meth:`concat` of which one is on disk. A set on disk is read a batch at a time
    (:meth:`take`, :meth:`iter_batches`, :meth:`read_batches`), never whole: :attr:`images`
    is for sets known to be in memory.
    """

    def __init__(self, images: torch.Tensor | cache.ImageStore | _Joined, labels: torch.Tensor | None = None, rows: np.ndarray | None = None):
        if isinstance(images, torch.Tensor):
            self._memory, self._source, self._rows = images, None, None
        else:
            self._memory, self._source = None, images
            self._rows = np.arange(images.rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        count = len(images) if self._rows is None else len(self._rows)
        self.labels = torch.full((count,), UNLABELLED, dtype=torch.int64) if labels is None else labels

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        where = "in memory" if self._source is None else f"on disk, {self._source.describe()}"
        return f"ImageTensors({len(self)} images of {self.image_shape}, {where})"

    @property
    def on_disk(self) -> bool:
        """Whether the images are read from disk a batch at a time rather than held in memory."""
        return self._source is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._source.shape) if self._source is not None else tuple(self._memory.shape[1:])

    @property
    def images(self) -> torch.Tensor:
        """All images as one tensor. For a set on disk this reads it whole: iterate with :meth:`iter_batches`."""
        return self._memory if self._source is None else self._source.read(self._rows)

    def take(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The images at positions ``index`` of this set, as a new or indexed tensor."""
        if self._source is None:
            return self._memory[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        return self._source.read(self._rows[np.asarray(index, dtype=np.int64)])

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageTensors":
        index = np.asarray(index, dtype=np.int64)
        labels = self.labels[torch.from_numpy(index)]
        if self._source is None:
            return ImageTensors(self._memory[torch.from_numpy(index)], labels)
        return ImageTensors(self._source, labels, self._rows[index])

    @staticmethod
    def concat(parts: Sequence["ImageTensors"]) -> "ImageTensors":
        """The sets one after the other: in memory when they all are, else read from their sources on demand."""
        labels = torch.cat([p.labels for p in parts])
        if all(p._source is None for p in parts):
            return ImageTensors(torch.cat([p._memory for p in parts]), labels)
        if len({id(p._source) for p in parts}) == 1:  # rows of one source: stay on disk
            return ImageTensors(parts[0]._source, labels, np.concatenate([p._rows for p in parts]))
        return ImageTensors(_Joined(parts), labels)

    def iter_batches(
        self, order: Sequence[int] | np.ndarray | torch.Tensor | None = None, batch_size: int = 64, *, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` for consecutive chunks of ``order`` (positions; default: in order), as :meth:`read_batches`."""
        if order is None and self._source is None:  # slices of memory: views, no copy
            for start in range(0, len(self), batch_size):
                images, labels = self._memory[start : start + batch_size], self.labels[start : start + batch_size]
                yield (images.pin_memory(), labels.pin_memory()) if pin_memory else (images, labels)
            return
        order = np.arange(len(self)) if order is None else np.asarray(order, dtype=np.int64)
        yield from self.read_batches([order[start : start + batch_size] for start in range(0, len(order), batch_size)], pin_memory=pin_memory)

    def read_batches(
        self, batches: Sequence[Sequence[int] | np.ndarray | torch.Tensor], *, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` at the positions of each of ``batches`` in turn.

        For a set on disk the next batch is read by a background thread while the caller
        works on this one, so a dataset larger than memory trains at about the speed of one
        in memory; a set in memory is indexed with no thread. ``pin_memory`` pins each batch (labels
        too: a copy from pageable memory can wait for the GPU) for asynchronous copies to a GPU.
        Close the iterator (or exhaust it) to stop the reader.
        """

        def load(index) -> tuple[torch.Tensor, torch.Tensor]:
            index = np.asarray(index, dtype=np.int64)
            images, labels = self.take(index), self.labels[torch.from_numpy(index)]
            return (images.pin_memory(), labels.pin_memory()) if pin_memory else (images, labels)

        if self._source is None:
            yield from map(load, batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="autoft-prefetch") as reader:
            upcoming = reader.submit(load, batches[0]) if len(batches) else None
            for i in range(len(batches)):
                current = upcoming
                upcoming = reader.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
                yield current.result()


class _Joined:
    """Sets read as one, some in memory and some on disk: rows ``0..len(first)-1`` are the first's, and so on."""

    def __init__(self, parts: Sequence[ImageTensors]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.starts = self.ends - [len(p) for p in self.parts]
        self.rows = int(self.ends[-1]) if self.parts else 0
        self.shape = self.parts[0].image_shape

    def describe(self) -> str:
        return f"{len(self.parts)} sets joined, {sum(p.on_disk for p in self.parts)} of them on disk"

    def read(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.ends, rows, side="right")
        out = torch.empty((len(rows), *self.shape), dtype=torch.uint8)
        for part in np.unique(which):
            here = np.flatnonzero(which == part)
            out[torch.from_numpy(here)] = self.parts[part].take(rows[here] - self.starts[part])
        return out


Images = torch.Tensor | ImageTensors  # what feature extraction accepts: uint8 (N, 3, S, S) in memory, or a set that may be on disk


def image_batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of ``images`` in order: slices of memory, or reads of a set on disk (the next read ahead)."""
    if isinstance(images, torch.Tensor):
        return (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    return (batch for batch, _ in images.iter_batches(batch_size=batch_size))


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
# Augmentation and batching


def train_augmentation(image_size: int, hflip: bool = True, scale: tuple[float, float] = (0.5, 1.0), *, shift: bool = False) -> torch.nn.Module:
    """Random resized crop and flip, per sample, on float batches in [0, 1] (kornia). ``shift``
    crops at full size instead, from the image padded by an eighth of its side (reflected):
    random shifts that keep all of a small object, as CIFAR recipes do."""
    import kornia.augmentation as K

    if shift:
        crop = K.RandomCrop((image_size, image_size), padding=max(1, image_size // 8), padding_mode="reflect")
    else:
        crop = K.RandomResizedCrop((image_size, image_size), scale=scale)
    steps: list[torch.nn.Module] = [crop]
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


def image_extensions() -> set[str]:
    """File extensions Pillow can open, lower case with the dot."""
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension PIL can open), sorted; see :func:`find_images` for the recursive rule."""
    extensions = image_extensions()
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))


LeftOut = list[tuple[Path, str]]  # (path, why it was left out)


def find_images(folder: Path) -> tuple[list[Path], LeftOut]:
    """Image files in ``folder`` and all its subfolders, sorted, and what was left out and why.

    Hidden files and folders (a leading ``.``) and files that are not images (by extension)
    are left out. Symbolic links to folders below ``folder`` are not followed (no loops).
    """
    extensions = image_extensions()
    found: list[Path] = []
    left_out: LeftOut = []
    for directory, subfolders, files in os.walk(folder):
        here = Path(directory)
        left_out += [(here / d, "hidden") for d in subfolders if d.startswith(".")]
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in files:
            path = here / name
            if name.startswith("."):
                left_out.append((path, "hidden"))
            elif path.suffix.lower() not in extensions:
                left_out.append((path, "not an image"))
            else:
                found.append(path)
    return sorted(found), sorted(left_out)


def warn_left_out(root: Path, left_out: LeftOut) -> None:
    """One warning for everything a folder scan left out, counted by reason with a few examples."""
    if not left_out:
        return
    by_reason: dict[str, list[Path]] = {}
    for path, reason in left_out:
        by_reason.setdefault(reason, []).append(path)

    def named(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    parts = []
    for reason, paths in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        examples = ", ".join(named(p) for p in paths[:2]) + (", ..." if len(paths) > 2 else "")
        parts.append(f"{len(paths)} {reason} ({examples})")
    warnings.warn(f"left out {len(left_out)} file(s) or folder(s) under {root}: " + "; ".join(parts), stacklevel=3)
