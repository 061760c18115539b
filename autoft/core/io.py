"""Atomic writes: a crash never leaves a half-written file (or folder) behind; a full disk
is one :class:`DiskFull` error naming the disk; and a lock for work only one process may do."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from autoft.errors import AutoftError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as exc:
        # The disk is measured as the write left it, before the partial file is deleted.
        full = DiskFull(path.parent) if isinstance(exc, Exception) and _ran_out_of_space(exc, path.parent) else None
        if full is not None:
            for error in _chain(exc):  # a writer left open in a failed frame (torch.save's) holds the partial file's space
                traceback.clear_frames(error.__traceback__)
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------
# A full disk

SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, named there from Python 3.11
NEARLY_FULL = 2**20  # bytes free, at most, on a disk where a write just failed for want of space


class DiskFull(AutoftError):
    """No space left to write ``folder``: one line naming the disk that holds it and its free space."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        super().__init__(
            f"no space left on {describe_disk(self.folder)}: could not write {self.folder}; "
            "free some space there and run the same command again to resume"
        )


def describe_disk(folder: Path) -> str:
    """``/mnt/data (ext4 /dev/sdb1, 12.0 KiB free of 20.0 GiB)``: the mount point holding ``folder``."""
    from autoft.core.text import human_bytes

    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    mount = folder.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(mount)
        space = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError:
        space = "free space unknown"
    filesystem = _filesystem(mount)
    return f"{mount} ({filesystem + ', ' if filesystem else ''}{space})"


def _filesystem(mount: Path) -> str:
    """``ext4 /dev/sdb1`` from the mount table, or "" where there is none to read (not Linux)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    found = ""
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]) == str(mount):
            found = f"{fields[2]} {fields[0]}"  # the last entry mounted there is the one in use
    return found


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, says a disk is full: ENOSPC, SQLite's
    SQLITE_FULL (through SQLAlchemy and Optuna's storage errors), or a :class:`DiskFull`."""
    return any(isinstance(e, DiskFull) or _no_space_errno(e) or _sqlite_full(e) for e in _chain(exc))


def disk_full_error(exc: BaseException, folder: str | os.PathLike) -> DiskFull | None:
    """The :class:`DiskFull` that ``exc`` amounts to, or None. An error that names no file
    (SQLite's, a write to an open file) is put on ``folder``."""
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return e
    named = [Path(e.filename).parent for e in _chain(exc) if _no_space_errno(e) and getattr(e, "filename", None)]
    if not named and not disk_full(exc):
        return None
    error = DiskFull(named[0] if named else folder)
    error.__cause__ = exc
    return error


def _ran_out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a write into ``folder`` failed for want of space. torch.save and numpy report a
    full disk without an errno (``RuntimeError: ... file write failed``, ``OSError: N requested
    and M written``), so for those the disk itself is asked."""
    if disk_full(exc):
        return True
    if not (isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno is None)):
        return False  # a missing file or a refused permission is no lack of space, however full the disk
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or during, SQLAlchemy's wrapped DB-API error included."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [link for link in (e.__cause__, e.__context__, getattr(e, "orig", None)) if isinstance(link, BaseException)]


def _no_space_errno(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _sqlite_full(exc: BaseException) -> bool:
    import sqlite3

    return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(exc))


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# Whole folders, and work only one process may do

_RENAME_EXCHANGE = 2  # renameat2(2): swap two paths in one step


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the folder ``staging`` in place of ``target`` in one step, then delete the old one.

    A reader that opens ``target`` sees the old folder or the new one, never a mix of their
    files. On Linux the two are swapped with ``renameat2(RENAME_EXCHANGE)``; where that is
    not available (other systems, some network filesystems) the old folder is renamed aside
    first, so for a moment ``target`` is missing, but still never mixed. Both paths must be
    on one filesystem: stage beside the target.
    """
    staging, target = Path(staging), Path(target)
    if not staging.is_dir():
        raise NotADirectoryError(staging)
    if not target.exists():
        os.rename(staging, target)
        return target
    if _exchange(staging, target):
        old = staging  # the swap left the previous version at the staging path
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or musl
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot swap
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


@contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) across processes on this machine.

    Yields True while held. With ``wait=False`` it yields False at once when another process
    holds it, for work that only one process should do and the others may skip (cleaning
    up trial folders). The lock goes with the process, so a killed holder releases it.
    ``flock`` does not lock across machines on most network filesystems.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
