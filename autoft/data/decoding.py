"""Images from a dataset source to tensors: decoded once at the planned size (in memory, or
in the decode cache on disk when they would not fit), checked, and split."""

from __future__ import annotations

import contextvars
import os
import shutil
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from autoft.data import cache
from autoft.data import DataSplits, ImageTensors
from autoft.errors import AutoftError
from autoft.specs import ImageSource, LabelledImages

Progress = Callable[[int, int], None]  # (images decoded, images in all), called as decoding goes
DEFAULT_MEMORY_FRACTION = 0.25  # of physical memory, for decoded images held in RAM
_decode_progress: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("autoft_decode_progress", default=None)


def decode_image(source: ImageSource, size: int) -> torch.Tensor:
    """Decode one image to RGB, resize its shorter side to ``size`` and centre-crop a square.

    Any change here must change :data:`autoft.data.cache.DECODE_SETTINGS`, which keys the cache.
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
    return decode_and_split(labelled, image_size=size, val_fraction=val_fraction, seed=seed, origin=f"dataset plugin {spec.name!r}", progress=progress)


def decode_and_split(
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


