"""Images decoded once, cached on disk, split, and augmented as tensors.

Dataset plugins return :class:`~autoft.specs.LabelledImages` (paths, PIL images or
arrays). :func:`prepare` decodes every image once, in a thread pool, to a square uint8
tensor at the training size, keeps the result in autoft's decoded-image cache (see
:mod:`autoft.cache`) so that the next command on the same images skips decoding, and
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

import contextvars
import os
import shutil
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from autoft import cache
from autoft.errors import AutoftError
from autoft.specs import ImageSource, LabelledImages

Progress = Callable[[int, int], None]  # (images decoded, images in all), called as decoding goes
DEFAULT_MEMORY_FRACTION = 0.25  # of physical memory, for decoded images held in RAM
_decode_progress: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("autoft_decode_progress", default=None)


UNLABELLED = -1  # the label of an image whose class is not known


class ImageTensors:
    """Decoded images, ``uint8`` in ``(N, 3, S, S)``, with ``int64`` labels (:data:`UNLABELLED` when not given).

    The images are a tensor in memory, or rows of a source read on demand: an
    :class:`~autoft.cache.ImageStore` (a set too big for memory), or sets joined by
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
# Decoding


def decode_image(source: ImageSource, size: int) -> torch.Tensor:
    """Decode one image to RGB, resize its shorter side to ``size`` and centre-crop a square.

    Any change here must change :data:`autoft.cache.DECODE_SETTINGS`, which keys the cache.
    """
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


def _decode_or_reason(source: ImageSource, size: int) -> torch.Tensor | str:
    try:
        return decode_image(source, size)
    except Exception as exc:  # any undecodable file is a skip, whatever PIL raises
        return f"{type(exc).__name__}: {exc}"


def source_name(sample: ImageSource, index: int) -> str:
    """How a sample is named in messages: its path, or its position for an in-memory image."""
    return os.fspath(sample) if isinstance(sample, (str, os.PathLike)) else f"sample {index}"


def decode_stream(
    samples: Sequence[ImageSource], size: int, *, workers: int | None = None, progress: Progress | None = None
) -> Iterator[tuple[int, torch.Tensor | str]]:
    """``(index, image or reason it failed)`` in sample order, decoded by a thread pool.

    Only a bounded window of images is in flight, so memory does not grow with the dataset.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    window: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="autoft-decode") as pool:  # PIL releases the GIL while decoding
        for index, sample in enumerate(samples):
            window.append((index, pool.submit(_decode_or_reason, sample, size)))
            if len(window) >= 4 * workers:
                index, future = window.popleft()
                yield index, future.result()
                if progress:
                    progress(index + 1, len(samples))
        while window:
            index, future = window.popleft()
            yield index, future.result()
            if progress:
                progress(index + 1, len(samples))


def decode_all(
    samples: Sequence[ImageSource], size: int, workers: int | None = None, progress: Progress | None = None
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode ``samples`` in memory. Unreadable ones are skipped and reported, not fatal.

    Returns the stacked images, the indices of the samples that decoded, and the
    ``(source, reason)`` of those skipped.
    """
    images, kept, skipped = [], [], []
    for index, result in decode_stream(samples, size, workers=workers, progress=progress):
        if isinstance(result, str):
            skipped.append((source_name(samples[index], index), result))
        else:
            images.append(result)
            kept.append(index)
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return stacked, kept, skipped


@contextmanager
def reporting_progress(callback: Progress | None) -> Iterator[None]:
    """Within this block, decoding for the cache reports ``(done, total)`` to ``callback``
    unless a call passes its own (the CLI shows a progress bar this way)."""
    token = _decode_progress.set(callback)
    try:
        yield
    finally:
        _decode_progress.reset(token)


def in_memory_limit() -> int:
    """Bytes of decoded images held in RAM; larger sets are read from the cache a batch at a time.

    ``$AUTOFT_MAX_IN_MEMORY`` (``512M``, ``4G``, ``0`` for always on disk), else a quarter of physical memory.
    """
    configured = os.environ.get("AUTOFT_MAX_IN_MEMORY")
    if configured:
        try:
            return cache.parse_bytes(configured)
        except ValueError:
            raise AutoftError(f"AUTOFT_MAX_IN_MEMORY={configured!r} is not a size such as 512M or 4G") from None
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_MEMORY_FRACTION)


def load_images(
    samples: Sequence[ImageSource],
    size: int,
    *,
    progress: Progress | None = None,
    use_cache: bool = True,
    memory_limit: int | None = None,
    origin: str | None = None,
) -> tuple[torch.Tensor | cache.ImageStore, list[int], list[tuple[str, str]]]:
    """Decoded ``samples`` through the cache: a tensor when within ``memory_limit``, else the cache entry.

    Returns the images, the indices of the samples that decoded, and the ``(source, reason)`` of
    those skipped. Where the cache cannot be written (no space, read-only), decodes in memory.
    """
    progress = progress or _decode_progress.get()
    if not use_cache:
        return decode_all(samples, size, progress=progress)
    key = cache.images_key(samples, size)
    store = cache.open_images(key)
    if store is None:
        problem = _cache_unwritable(len(samples) * 3 * size * size)
        if problem:
            warnings.warn(f"decoding in memory, without the cache: {problem}", stacklevel=3)
            return decode_all(samples, size, progress=progress)
        store = _build_cache(samples, size, key, progress, origin)
    limit = in_memory_limit() if memory_limit is None else memory_limit
    images = store.read_all() if store.nbytes <= limit else store
    return images, store.kept, store.skipped


def _cache_unwritable(expected_bytes: int) -> str | None:
    root = cache.cache_root() / cache.IMAGES
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return f"cannot write to {root} ({exc.strerror or exc})"
    if free < expected_bytes * 1.05 + 2**26:
        return f"{cache.human_bytes(free)} free in {root}, the images need {cache.human_bytes(expected_bytes)} (set AUTOFT_CACHE_DIR)"
    return None


def _build_cache(samples: Sequence[ImageSource], size: int, key: str, progress: Progress | None, origin: str | None) -> cache.ImageStore:
    with cache.new_images(key, size, samples=samples, origin=origin) as (writer, meta):
        for index, result in decode_stream(samples, size, progress=progress):
            if isinstance(result, str):
                meta["skipped"].append([index, source_name(samples[index], index), result])
            else:
                writer.append(result)
    store = cache.open_images(key)  # verified as any later reader would (or the entry of a process that won a race)
    if store is None:
        raise AutoftError(f"the decoded-image cache in {cache.cache_root()} could not be read back; set AUTOFT_CACHE_DIR elsewhere")
    return store


def warn_skipped(skipped: Sequence[tuple[str, str]], total: int) -> None:
    """One warning for all the images that could not be decoded, with a few examples."""
    if skipped:
        examples = "; ".join(f"{src} ({why})" for src, why in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {total}: {examples}{more}", stacklevel=3)


# ---------------------------------------------------------------------------
# Loading, checking and splitting


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
    progress: Progress | None = None,
) -> DataSplits:
    """Load what the user typed through its dataset plugin, decode once (cached) and split."""
    from autoft import plugins

    registry = registry or plugins.registry()
    spec, argument = registry.dataset(source)
    labelled = spec.factory(argument)
    size = image_size or labelled.image_size or default_size
    return prepare(labelled, image_size=size, val_fraction=val_fraction, seed=seed, origin=f"dataset plugin {spec.name!r}", progress=progress)


def prepare(
    labelled: LabelledImages,
    *,
    image_size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    origin: str = "the dataset",
    progress: Progress | None = None,
    use_cache: bool = True,
) -> DataSplits:
    """Check ``labelled``, decode it (through the cache unless ``use_cache=False``) and split it.

    ``origin`` names where the images came from in error messages; ``progress`` is called
    with ``(decoded, total)`` as decoding goes (default: the one set by :func:`reporting_progress`).
    """
    labels = check_labels(labelled, origin)
    images, kept, skipped = load_images(labelled.samples, image_size, progress=progress, use_cache=use_cache, origin=origin)
    warn_skipped(skipped, len(labelled.samples))
    if not kept:
        raise AutoftError("no readable images found")
    labels = labels[kept]
    present = np.unique(labels)
    if len(present) < 2:
        raise AutoftError(f"need at least two classes, found {len(present)} ({labelled.classes[present[0]]!r})")
    every = ImageTensors(images, torch.from_numpy(labels))
    splits = np.asarray(labelled.splits)[kept] if labelled.splits is not None else None
    check_class_sizes(labels, splits, labelled.classes)

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


def check_labels(labelled: LabelledImages, origin: str) -> np.ndarray:
    """The labels as int64, checked before any decoding: as many as samples, integers, in range."""
    if len(labelled.samples) != len(labelled.labels):
        raise AutoftError(f"{origin} returned {len(labelled.samples)} samples but {len(labelled.labels)} labels")
    if len(labelled.samples) == 0:
        raise AutoftError("no images found")
    try:
        labels = np.asarray(labelled.labels).astype(np.int64, casting="safe")
    except (TypeError, ValueError):
        raise AutoftError(f"{origin} returned labels that are not integers (e.g. {labelled.labels[0]!r}); labels index its classes") from None
    if labels.ndim != 1:
        raise AutoftError(f"{origin} returned labels of shape {labels.shape}; expected one integer per sample")
    outside = (labels < 0) | (labels >= len(labelled.classes))
    if outside.any():
        counts = Counter(labels.tolist())
        shown = ", ".join(f"{label}: {n}" + (" (out of range)" if not 0 <= label < len(labelled.classes) else "") for label, n in sorted(counts.items()))
        raise AutoftError(
            f"{origin} returned {int(outside.sum())} label(s) outside 0..{len(labelled.classes) - 1} "
            f"for its {len(labelled.classes)} classes; images per label: {shown}"
        )
    return labels


MIN_IMAGES_PER_CLASS = 2  # one to train on and one to validate on; BatchNorm cannot train on one


def check_class_sizes(labels: np.ndarray, splits: np.ndarray | None, classes: Sequence[str]) -> None:
    """Every class needs images to train and validate on: at least two outside the test split, one of them in train."""
    trainable = labels if splits is None else labels[splits != "test"]
    counts = np.bincount(trainable, minlength=len(classes))
    in_train = counts if splits is None else np.bincount(labels[splits == "train"], minlength=len(classes))
    short = [i for i in range(len(classes)) if counts[i] < MIN_IMAGES_PER_CLASS or in_train[i] == 0]
    if short:
        listed = ", ".join(f"{classes[i]!r} ({counts[i]})" for i in short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        where = "readable images" if splits is None else "readable train/val images, at least one in train"
        raise AutoftError(
            f"every class needs at least {MIN_IMAGES_PER_CLASS} {where}; too few in {listed}: add images or remove the class"
        )


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
