"""Atomic writes: a crash never leaves a half-written file (or folder) behind; and a lock
for work only one process may do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
