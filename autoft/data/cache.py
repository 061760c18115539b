"""autoft's cache on disk: decoded images that every command reuses, beside the pretraining stages.

The root is ``$AUTOFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoft``, else ``~/.cache/autoft``::

    images/<key>/images.u8    decoded uint8 images, (rows, 3, S, S), C order, no header
    images/<key>/meta.json    shape, the samples left out, per-block CRC32 checksums
    pretrain/<key>/...        pretraining stages (autoft.training.pretraining)

**The key of decoded images** hashes, for each sample in order, the absolute path (as the
file system's bytes), size and modification time (ns) of a file, or a SHA-256 of the pixels
of an in-memory image; then the image size, :data:`DECODE_SETTINGS` and Pillow's version.
Files are keyed by ``stat``, not content: hashing 100,000 photos costs about as much as
decoding them, and a file rewritten in place gets a new mtime. (A tool that replaces a file
keeping its size and mtime would go unnoticed: clear the cache.)

**Writes are atomic**: an entry is built in ``images/.<key>.<pid>.<random>.partial`` and renamed
into place whole. **Opening verifies** the format, the file's size against the shape, and the
CRC32 of its blocks (all of them up to :data:`FULL_VERIFY_BYTES`, else the first, the last and
evenly spaced ones); an entry that fails is removed and rebuilt, never read.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from autoft.core.io import read_json, write_json
from autoft.core.text import human_bytes  # noqa: F401 - cache sizes, as `autoft cache` prints them

IMAGES = "images"
PRETRAIN = "pretrain"
KINDS = (IMAGES, PRETRAIN)
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"
FORMAT = "autoft-decoded-images/1"
# How decode_image turns a file into pixels; change it whenever decode_image changes.
DECODE_SETTINGS = "rgb, exif-transposed, jpeg-draft, shorter-side-bicubic, centre-crop"
BLOCK_BYTES = 16 * 2**20  # one CRC32 per block of about this many bytes
FULL_VERIFY_BYTES = 2**30  # up to this size every block is checked on open
SAMPLED_BLOCKS = 16  # above it, this many blocks spread over the file


def cache_root() -> Path:
    """The root of autoft's cache; pretraining keeps its stages in ``cache_root() / "pretrain"``."""
    if os.environ.get("AUTOFT_CACHE_DIR"):
        return Path(os.environ["AUTOFT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "autoft"


# ---------------------------------------------------------------------------
# Keys


def sample_identity(sample: Any) -> bytes:
    """What identifies one sample's pixels: a file's path, size and mtime, or a hash of an in-memory image.

    A path is taken as the file system's bytes: on Linux a name need not be UTF-8
    (``\\xff\\xfe.png`` reaches Python as lone surrogates, which ``str.encode`` refuses).
    """
    if isinstance(sample, (str, os.PathLike)):
        path = os.fsencode(os.path.abspath(os.fspath(sample)))
        try:
            stat = os.stat(path)
        except OSError:
            return b"missing:" + path  # decoding will skip it and say why
        return b"file:%s:%d:%d" % (path, stat.st_size, stat.st_mtime_ns)
    if isinstance(sample, np.ndarray):
        array = np.ascontiguousarray(sample)
        header = f"{array.dtype.str}:{array.shape}".encode()
        return b"array:" + hashlib.sha256(header + array.tobytes()).hexdigest().encode()
    from PIL import Image

    if isinstance(sample, Image.Image):
        header = f"{sample.mode}:{sample.size}".encode()
        return b"pil:" + hashlib.sha256(header + sample.tobytes()).hexdigest().encode()
    raise TypeError(f"a sample must be a path, a PIL image or a uint8 array, got {type(sample).__name__}")


def images_key(samples: Sequence[Any], image_size: int) -> str:
    import PIL

    digest = hashlib.sha256(f"{FORMAT}|{DECODE_SETTINGS}|pillow {PIL.__version__}|{image_size}|{len(samples)}\n".encode())
    for sample in samples:
        digest.update(sample_identity(sample) + b"\n")
    return digest.hexdigest()[:40]


def describe_samples(samples: Sequence[Any], origin: str | None = None) -> str:
    """A short human description of where the images came from, for ``autoft cache list``."""
    paths = [os.path.abspath(os.fspath(s)) for s in samples if isinstance(s, (str, os.PathLike))]
    if len(paths) == len(samples) and paths:
        try:
            return os.path.commonpath(paths)
        except ValueError:  # different drives
            return f"{len(paths)} files"
    text = f"{len(samples)} in-memory images" if not paths else f"{len(samples)} images, {len(paths)} of them files"
    return f"{text} ({origin})" if origin else text


# ---------------------------------------------------------------------------
# Reading


class ImageStore:
    """A verified cache entry: ``rows`` decoded images of shape ``(3, S, S)`` read on demand,
    with ``os.pread`` into fresh buffers: a memory map's pages of a dataset larger than memory
    would count in the process's RSS until the kernel evicts them."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta
        self.file = folder / IMAGES_FILE
        self.rows = int(meta["rows"])
        self.shape = tuple(meta["shape"])
        self.row_bytes = int(np.prod(self.shape))
        self._fd: int | None = os.open(self.file, os.O_RDONLY)  # opened now: batches are read from several threads

    def describe(self) -> str:
        return f"at {self.folder}"

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def kept(self) -> list[int]:
        """Indices of the samples stored, in row order (those that decoded)."""
        left_out = {index for index, _, _ in self.meta["skipped"]}
        return [i for i in range(int(self.meta["samples"])) if i not in left_out]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(source, reason) for _, source, reason in self.meta["skipped"]]

    def read(self, rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Images at ``rows`` (any order, repeats allowed) as a new uint8 tensor; runs of consecutive rows are read at once."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        flat = out.reshape(len(rows), self.row_bytes)
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.folder} was closed")
        starts = np.flatnonzero(np.diff(rows, prepend=rows[:1] - 2) != 1).tolist()  # where runs of consecutive rows begin
        for start, end in zip(starts, [*starts[1:], len(rows)]):
            self._read_into(fd, flat[start:end], int(rows[start]))
        return torch.from_numpy(out)

    def _read_into(self, fd: int, target: np.ndarray, first_row: int) -> None:
        view = memoryview(target).cast("B")
        offset, done = first_row * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.file} ended early (a cache file changed while in use)")
            done += got

    def read_all(self) -> torch.Tensor:
        return self.read(np.arange(self.rows))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if hasattr(self, "_fd"):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "meta": self.meta}  # a descriptor is per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["meta"])


def open_images(key: str) -> ImageStore | None:
    """The verified entry for ``key``, or None; an entry that fails verification is removed."""
    folder = cache_root() / IMAGES / key
    if not folder.is_dir():
        return None
    problem = _verify(folder)
    if problem is None:
        return ImageStore(folder, read_json(folder / META_FILE))
    import warnings

    warnings.warn(f"decoded-image cache {folder} is unusable ({problem}); decoding again", stacklevel=3)
    remove_entry(folder)
    return None


def _verify(folder: Path) -> str | None:
    """None when the entry is whole and its checksums match, else what is wrong."""
    try:
        meta = read_json(folder / META_FILE)
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')!r}"
        row_bytes = int(np.prod(meta["shape"]))
        size = (folder / IMAGES_FILE).stat().st_size
        if size != int(meta["rows"]) * row_bytes:
            return f"{IMAGES_FILE} holds {size} bytes, expected {int(meta['rows']) * row_bytes}"
        block_bytes = int(meta["block_rows"]) * row_bytes
        checksums = meta["block_crc32"]
        if len(checksums) != -(-size // block_bytes):
            return f"{len(checksums)} checksums for {size} bytes"
        with open(folder / IMAGES_FILE, "rb") as f:
            for block in _blocks_to_verify(len(checksums), size):
                if _crc32(f.fileno(), block * block_bytes, min(block_bytes, size - block * block_bytes)) != checksums[block]:
                    return f"checksum mismatch in block {block}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _crc32(fd: int, offset: int, length: int, chunk: int = 2**20) -> int:
    """CRC32 of a byte range, read a MiB at a time so that verifying costs no memory."""
    crc = 0
    for start in range(offset, offset + length, chunk):
        crc = zlib.crc32(os.pread(fd, min(chunk, offset + length - start), start), crc)
    return crc


def _blocks_to_verify(blocks: int, size: int) -> list[int]:
    if size <= FULL_VERIFY_BYTES or blocks <= SAMPLED_BLOCKS:
        return list(range(blocks))
    return sorted({0, blocks - 1, *np.linspace(0, blocks - 1, SAMPLED_BLOCKS).round().astype(int).tolist()})


# ---------------------------------------------------------------------------
# Writing


@dataclass
class ImageWriter:
    """Appends decoded images to a partial entry, one checksum per block of rows."""

    file: Any
    shape: tuple[int, ...]
    block_rows: int
    rows: int = 0
    pending: int = 0

    def __post_init__(self) -> None:
        self.checksums: list[int] = []
        self.crc = 0

    def append(self, image: torch.Tensor) -> None:
        data = image.contiguous().numpy().tobytes()
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.rows, self.pending = self.rows + 1, self.pending + 1
        if self.pending == self.block_rows:
            self._close_block()

    def _close_block(self) -> None:
        self.checksums.append(self.crc)
        self.crc, self.pending = 0, 0

    def finish(self) -> None:
        if self.pending:
            self._close_block()


@contextmanager
def new_images(key: str, image_size: int, *, samples: Sequence[Any], origin: str | None = None) -> Iterator[tuple[ImageWriter, dict[str, Any]]]:
    """Build an entry for ``key`` in a partial folder and publish it whole on success.

    Yields the writer and the meta dict; the caller appends images and fills ``meta["skipped"]``
    with ``[index, source, reason]``. When another process published the same key first,
    its entry is kept and this one is discarded.
    """
    root = cache_root() / IMAGES
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root, key)
    work = root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    work.mkdir()
    shape = (3, image_size, image_size)
    meta: dict[str, Any] = {
        "format": FORMAT, "key": key, "source": describe_samples(samples, origin), "samples": len(samples), "shape": list(shape),
        "dtype": "uint8", "decode": DECODE_SETTINGS, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": [],
    }  # fmt: skip
    try:
        with open(work / IMAGES_FILE, "wb") as f:
            writer = ImageWriter(f, shape, block_rows=max(1, BLOCK_BYTES // int(np.prod(shape))))
            yield writer, meta
            writer.finish()
            f.flush()
            os.fsync(f.fileno())
        meta.update(rows=writer.rows, block_rows=writer.block_rows, block_crc32=writer.checksums)
        write_json(work / META_FILE, meta)
        try:
            os.rename(work, root / key)
        except OSError:
            if not (root / key).is_dir():  # not a lost race with another process publishing the key: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_abandoned(root: Path, key: str) -> None:
    """Delete unfinished entries of ``key`` left by processes that no longer run (a kill -9)."""
    for partial in root.glob(f".{key}.*.partial"):
        try:
            pid = int(partial.name.split(".")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours to judge: a name we did not write, or another user's live process


def remove_entry(folder: Path) -> None:
    """Remove an entry so that no reader sees it half deleted: rename it aside first."""
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # already gone (another process removed it)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------
# Listing and clearing (``autoft cache``)


@dataclass
class CacheEntry:
    kind: str  # "images" or "pretrain"
    path: Path
    bytes: int
    description: str
    modified: float


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def list_entries(kinds: Sequence[str] = KINDS) -> list[CacheEntry]:
    """Every finished entry of ``kinds``, largest first; leftovers of killed processes are listed as such."""
    entries = []
    for kind in kinds:
        root = cache_root() / kind
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if folder.is_dir():
                description = "unfinished (left by a stopped process)" if folder.name.startswith(".") else _describe(kind, folder)
                entries.append(CacheEntry(kind, folder, folder_bytes(folder), description, folder.stat().st_mtime))
    return sorted(entries, key=lambda e: -e.bytes)


def _describe(kind: str, folder: Path) -> str:
    try:
        if kind == IMAGES:
            meta = read_json(folder / META_FILE)
            return f"{meta['rows']} images at {meta['shape'][-1]}px from {meta['source']}"
        metrics = read_json(folder / "metrics.json")
        return f"{metrics.get('method', '?')} pretraining of {metrics.get('backbone', '?')}, {len(metrics.get('epochs', []))} epochs"
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # a JSONDecodeError is a ValueError
        return "unreadable (will be rebuilt when used)"


def clear(kinds: Sequence[str] = KINDS) -> tuple[int, int]:
    """Remove every entry of ``kinds`` but those a running process is building; returns (entries removed, bytes freed)."""
    removed, freed = 0, 0
    for entry in list_entries(kinds):
        if entry.path.name.startswith("."):
            remove_abandoned(entry.path.parent, entry.path.name.split(".")[1])
            if entry.path.exists():
                continue
        else:
            remove_entry(entry.path)
        removed, freed = removed + 1, freed + entry.bytes
    return removed, freed


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"4GiB"``, ``"1e9"`` -> bytes."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    clean = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (clean[:-1], clean[-1]) if clean and clean[-1] in units else (clean, "")
    return int(float(number) * units[unit])
