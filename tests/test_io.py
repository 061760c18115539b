"""Atomic folder swaps under a concurrent reader, a write that finds the disk full, and the cross-process file lock."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autoft.core import io as autoft_io
from autoft.core.io import DiskFull, atomic_path, file_lock, publish_dir, write_text

FILES = ("model.pt", "model.onnx", "metrics.json")


def stage(root: Path, version: int) -> Path:
    staging = root / f".best.staging-{version}"
    staging.mkdir()
    for name in FILES:
        (staging / name).write_text(f"{version}\n" * 2000)  # big enough that copying takes a while
    return staging


def read_version(target: Path) -> set[str] | None:
    """Every file's version, read through one open handle on the folder, as a reader who
    opens ``best/`` and then its files sees it; None when the folder went away meanwhile."""
    try:
        folder = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        versions = set()
        for name in FILES:
            with open(name, opener=lambda path, flags: os.open(path, flags, dir_fd=folder)) as handle:
                versions |= set(handle.read().split())
        return versions
    except FileNotFoundError:  # the old version, deleted after the swap, before we read it all
        return None
    finally:
        os.close(folder)


@pytest.mark.parametrize("exchange", ["renameat2", "rename aside"])
def test_a_reader_never_sees_two_versions_mixed(tmp_path, monkeypatch, exchange):
    if exchange == "rename aside":
        monkeypatch.setattr(autoft_io, "_exchange", lambda a, b: False)  # as where renameat2 is missing
    target = tmp_path / "best"
    publish_dir(stage(tmp_path, 0), target)
    seen: list[set[str]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            versions = read_version(target)
            if versions is not None:
                seen.append(versions)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 60):
            publish_dir(stage(tmp_path, version), target)
    finally:
        done.set()
        thread.join()
    assert seen, "the reader never read the folder"
    mixed = [v for v in seen if len(v) != 1]
    assert not mixed, f"a reader saw files of versions {sorted(mixed[0])} together"
    assert len({next(iter(v)) for v in seen}) > 1  # it read while versions changed
    assert (target / "model.pt").read_text().split()[0] == "59"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # every old version deleted


def test_publishing_where_there_was_nothing_and_from_a_missing_folder(tmp_path):
    target = publish_dir(stage(tmp_path, 7), tmp_path / "best")
    assert (target / "metrics.json").read_text().split()[0] == "7"
    with pytest.raises(NotADirectoryError):
        publish_dir(tmp_path / "nothing", target)
    assert (target / "metrics.json").read_text().split()[0] == "7"


HOLDER = """
import sys
from autoft.core.io import file_lock
with file_lock(sys.argv[1]) as held:
    print("held" if held else "not held", flush=True)
    sys.stdin.read()
"""


def test_only_one_process_holds_the_lock_and_a_killed_holder_releases_it(tmp_path):
    lock = tmp_path / "runs" / "cleanup.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with file_lock(lock, wait=False) as held:
            assert held is False
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup code runs
        holder.wait(10)
        with file_lock(lock, wait=False) as held:
            assert held is True
            with file_lock(lock, wait=False) as again:  # another handle, as another process has
                assert again is False
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_waiting_lock_is_granted_when_the_holder_lets_go(tmp_path):
    lock = tmp_path / "cleanup.lock"
    order: list[str] = []
    with file_lock(lock) as held:
        assert held

        def waiter() -> None:
            with file_lock(lock):
                order.append("waiter")

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()  # blocked while we hold it
        order.append("holder done")
    thread.join(10)
    assert order == ["holder done", "waiter"]


# ---------------------------------------------------------------------------
# A full disk


def df(path: Path) -> tuple[str, str]:
    """The mount point and filesystem type holding ``path``, as ``df`` reports them."""
    lines = subprocess.run(["df", "--output=target,fstype", str(path)], capture_output=True, text=True, check=True).stdout.splitlines()
    target, fstype = lines[1].rsplit(None, 1)
    return target.strip(), fstype


@pytest.mark.parametrize("failure", ["ENOSPC", "torch.save"])
def test_a_write_that_finds_the_disk_full_is_one_error_naming_the_disk_and_the_folder(tmp_path, monkeypatch, failure):
    target = tmp_path / "trials" / "3" / "state.pt"
    write_text(target, "the last state saved")
    with pytest.raises(DiskFull) as caught:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"\0" * 4096)  # what fitted before the disk filled up
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write(2) on a full disk
            # torch.save names no errno for a full disk; the disk itself is asked, and finds no room.
            monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    message = str(caught.value)
    mount, fstype = df(tmp_path)
    assert "\n" not in message
    assert message.startswith(f"no space left on {mount} ({fstype} "), message
    if failure == "torch.save":
        assert "0 B free of 1.0 GiB" in message  # the space as the failed write left it
    assert f"could not write {target.parent};" in message and "run the same command again" in message
    assert [p.name for p in target.parent.iterdir()] == ["state.pt"] and target.read_text() == "the last state saved"  # the partial file is gone


def test_a_write_that_fails_on_a_disk_with_room_is_not_called_full(tmp_path):
    assert shutil.disk_usage(tmp_path).free > 2**20
    with pytest.raises(RuntimeError, match="cannot pickle"):
        with atomic_path(tmp_path / "state.pt"):
            raise RuntimeError("cannot pickle 'generator' object")
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "state.pt"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []
