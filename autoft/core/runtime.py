"""Where and how training runs: the device, seeds, mixed precision, and stopping on request.

A first Ctrl-C asks every training loop in the process to stop after its current batch
(:func:`stop_requested`); a second one aborts at once. :func:`graceful_interrupts` installs
that behaviour for a command.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from typing import Callable, Iterator

import numpy as np
import torch

import autoft
from autoft.errors import AutoftError

_stop = threading.Event()
_signal: list[int] = []  # the signal that asked for the stop: SIGINT (Ctrl-C) or SIGTERM (docker stop, systemd, Kubernetes)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AutoftError("--device cuda was asked for, but no CUDA GPU is usable here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise AutoftError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def as_device(device: torch.device | str) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 mixed precision on CUDA; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Channels-last on CUDA, where convolutions run faster with it."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then a cosine to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------
# Stopping after the current batch


def stop_requested() -> bool:
    """Whether the user asked every training loop to stop after its current batch."""
    return _stop.is_set()


def request_stop() -> None:
    _stop.set()


def clear_stop() -> None:
    _stop.clear()
    _signal.clear()


def stop_signal() -> int | None:
    """The signal that asked the process to stop (``signal.SIGINT``, ``signal.SIGTERM``), or None."""
    return _signal[0] if _signal else None


@contextlib.contextmanager
def graceful_interrupts(on_first: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within the block, a first Ctrl-C or SIGTERM (what ``docker stop``, systemd and Kubernetes
    send) sets :func:`stop_requested` and calls ``on_first`` (which prints "stopping after this
    batch; Ctrl-C again to abort"); a second raises ``KeyboardInterrupt``. Outside the main
    thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if _stop.is_set():
            raise KeyboardInterrupt
        _signal[:] = [signum]
        _stop.set()
        on_first()

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)
        clear_stop()


# ---------------------------------------------------------------------------
# Processes and threads


INTERPRETER_START = 1.0  # seconds: the most an interpreter takes to start before it imports autoft (0.02 s here)


def process_started() -> float:
    """When this program started, as a ``time.monotonic()`` value: the process's start read from
    ``/proc`` (where that cannot be read, not Linux: the first import of autoft), but no earlier
    than :data:`INTERPRETER_START` before the first import of autoft. A shell execs the last
    command of ``bash -c "... && pip install -e . && autoft search ..."`` in its own process,
    whose start in ``/proc`` is the shell's: the README's quick start run that way counted the
    install's 100 s against its minute, and was refused after "1m45s of checks and calibration"."""
    imported = autoft._IMPORTED_AT
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return imported
    return max(imported - INTERPRETER_START, time.monotonic() - max(0.0, since))


def resolve_jobs(jobs: int | str, device: torch.device) -> int:
    """``auto``: one per GPU, one on a CPU."""
    if jobs == "auto":
        return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    return int(jobs)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    return max(1, cores() // jobs)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Intra-op threads of this process within the block (None or 0: as they are)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def blas_alone(function: Callable) -> Callable:
    """Run ``function`` (scikit-learn work) with NumPy's and SciPy's BLAS on one thread.

    Beside torch, whose OpenMP threads spin-wait between operations, OpenBLAS's own threads
    fight them for the cores: inside a search on 2 cores, logistic regression on 80 images'
    pixels took 8.6 s instead of 0.4 s, and the simple models took 20 s instead of 3 s
    (OPENBLAS_NUM_THREADS=1 measured the same). The matrices scikit-learn sees here are
    small enough that one thread loses nothing.
    """
    from functools import wraps

    @wraps(function)
    def alone(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return alone
