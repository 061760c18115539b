"""Parallel trials on one machine: ``autoft search --jobs N``.

The command's own process prepares the search as always (calibration, the plan, decoding,
pretraining, baselines), then runs trials as worker 0 while N-1 worker processes run
trials on the same study. A worker is what a second machine on a shared storage would be:
it opens the study (a journal file by default, see
:func:`~autoft.searching.storage.default_storage_url`), decodes the images (from the disk
cache, see :mod:`autoft.cache`) and asks the sampler for the next trial; the storage keeps
the workers apart and ``--trials`` counts them all. It takes the plan, the search space
(with the pretraining stage's checkpoints) and the deadline from the command, so every
worker searches the same thing within the same budget.

On a CPU the workers divide its cores (each gets its share of threads, so the machine is
not oversubscribed); with GPUs each worker takes one. When the trials are over, the
command waits for the workers and then refits, exports and reports as with one worker.

Ctrl-C reaches every worker, as they share the terminal's process group: each stops after
its batch, and a rerun resumes. A stop the workers may not have received (a SIGTERM sent to
the command alone, as ``docker stop`` does) is passed on to them as SIGUSR1, which only ever
asks for a stop after the batch. A worker dies with the command (``PR_SET_PDEATHSIG`` on
Linux), so a killed search leaves RUNNING trials that the next run recovers, never a
worker training on alone. Workers load the command's plugins (``--plugins-dir`` included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import optuna
import torch

from autoft.events import TrialEnd, WorkerFailed
from autoft.planning import Plan
from autoft.searching.config import SearchConfig

JOIN_GRACE = 60.0  # seconds past the deadline a worker may take to finish its batch and record its trial
STOP_SIGNAL = signal.SIGUSR1  # from the command to its workers: stop after the batch (never an abort)


@dataclass
class WorkerSpec:
    """What a worker process needs from the command: picklable, no callbacks."""

    index: int
    config: SearchConfig
    plan: Plan
    deadline: float | None  # wall-clock (time.time()) end of the command, before export
    threads: int
    device: str
    embedders: dict[str, str | None]  # name -> the weights whose features label the unlabelled images
    verbosity: int  # Optuna's logging level in the command
    plugins_dir: str | None = None  # the command's --plugins-dir (AUTOFT_PLUGINS_DIR and AUTOFT_DISABLE_PLUGIN_AUTOLOAD pass in the environment)

    def monotonic_deadline(self) -> float | None:
        return None if self.deadline is None else time.monotonic() + (self.deadline - time.time())


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
def torch_threads(count: int) -> Iterator[None]:
    """Intra-op threads of this process within the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def parallel_workers(session) -> Iterator[None]:
    """Start ``session.jobs - 1`` worker processes for the block (the caller runs trials
    too, as worker 0, with its share of threads); wait for them when it ends."""
    if session.jobs <= 1:
        yield
        return
    threads = threads_per_job(session.jobs)
    context = multiprocessing.get_context("spawn")  # fork and torch's thread pools do not mix
    events = context.Queue()
    processes = [context.Process(target=worker_main, args=(_spec(session, index, threads), events), name=f"autoft-worker-{index}") for index in range(1, session.jobs)]
    for process in processes:
        process.start()
    forwarder = threading.Thread(target=_forward, args=(events, session), name="autoft-worker-events", daemon=True)
    forwarder.start()
    try:
        with torch_threads(threads):
            yield
    except BaseException:
        _interrupt(processes, STOP_SIGNAL)  # they stop after their batch
        _wait(processes, time.monotonic() + JOIN_GRACE)
        _interrupt(processes, signal.SIGINT)
        _wait(processes, time.monotonic() + 5.0)
        raise
    else:
        _wait(processes, None if session.deadline is None else session.deadline + JOIN_GRACE)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()  # past every grace: its trial is left RUNNING for the next run to recover
        events.put(None)
        forwarder.join(timeout=5.0)


def _spec(session, index: int, threads: int) -> WorkerSpec:
    config = session.config
    space = dataclasses.replace(session.space, regularizer_objects={})
    worker_config = dataclasses.replace(
        config, out=session.out, storage=session.storage_url, study=session.study.study_name, weights=session.weights or "scratch",
        space=space, jobs=1, on_event=None, pre_search=(), sampler=config.sampler if isinstance(config.sampler, str) else "tpe",
    )  # fmt: skip
    device = str(session.device)
    if session.device.type == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{index % torch.cuda.device_count()}"
    deadline = None if session.deadline is None else time.time() + (session.deadline - time.monotonic())
    from autoft import plugins

    return WorkerSpec(index=index, config=worker_config, plan=session.plan, deadline=deadline, threads=threads, device=device, embedders=dict(session.embedder_weights),
        verbosity=optuna.logging.get_verbosity(), plugins_dir=plugins.default_plugins_dir(),
    )


def _forward(events, session) -> None:
    """The workers' trial results, shown by the command's display as its own."""
    while True:
        event = events.get()
        if event is None:
            return
        if isinstance(event, WorkerFailed):
            session.notes.append(f"worker {event.worker} stopped: {event.reason}")
        session.emit(event)


def _wait(processes: list, until: float | None) -> None:
    """Join the workers until ``until``; a stop asked of the command meanwhile is passed on to them."""
    from autoft.runtime import stop_requested

    passed_on = False
    for process in processes:
        while process.is_alive():
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                return
            if stop_requested() and not passed_on:
                _interrupt(processes, STOP_SIGNAL)
                passed_on = True
            process.join(0.2 if left is None else min(0.2, left))


def _interrupt(processes: list, number: int) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, number)


# ---------------------------------------------------------------------------
# In the worker process


def worker_main(spec: WorkerSpec, events) -> None:
    """Run trials until the study's cap or the deadline; report each to the command."""
    from autoft.errors import AutoftError
    from autoft.runtime import graceful_interrupts

    from autoft import plugins
    from autoft.runtime import request_stop

    _die_with_parent()
    signal.signal(STOP_SIGNAL, lambda signum, frame: request_stop())  # the command's stop: never an abort
    optuna.logging.set_verbosity(spec.verbosity)
    torch.set_num_threads(spec.threads)
    with graceful_interrupts():
        try:
            if spec.plugins_dir is not None:
                plugins.set_default_plugin_manager(plugins.get_plugin_manager(spec.plugins_dir))
            _run(spec, events)
        except KeyboardInterrupt:
            pass
        except AutoftError as exc:
            events.put(WorkerFailed(spec.index, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the command goes on with the other workers
            events.put(WorkerFailed(spec.index, f"{type(exc).__name__}: {exc}"))


def _run(spec: WorkerSpec, events) -> None:
    import socket

    from autoft.searching.preparing import prepare, features_of
    from autoft.searching.runner import make_pruner, make_sampler, run_trials

    session = prepare(dataclasses.replace(spec.config, device=spec.device), worker=spec)
    for name, weights in spec.embedders.items():
        session.embedders[name] = features_of(session, weights)
    seed = zlib.crc32(f"{spec.config.seed}/worker{spec.index}/{socket.gethostname()}/{os.getpid()}".encode())
    session.study.sampler = make_sampler(spec.config.sampler, seed)
    session.study.pruner = make_pruner(spec.config.pruner, session.plan.evaluations, session.cross_validated)
    session.on_event = lambda event: events.put(event) if isinstance(event, TrialEnd) else None
    run_trials(session, [])


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the command's process dies (``kill -9`` included)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
