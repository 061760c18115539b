"""Parallel trials on one machine: ``autoft search --jobs N``.

The command's own process prepares the search as always (calibration, the plan, decoding,
pretraining, baselines), then runs trials as worker 0 while N-1 worker processes run
trials on the same study. A worker is what a second machine on a shared storage would be:
it opens the study (a journal file by default, see
:func:`~autoft.searching.storage.default_storage_url`), decodes the images (from the disk
cache, see :mod:`autoft.data.cache`) and asks the sampler for the next trial; the storage keeps
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
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import optuna
import torch

from autoft.core.events import WorkerFailed
from autoft.core.runtime import threads_per_job, torch_threads
from autoft.searching.session import SearchContext

JOIN_GRACE = 60.0  # seconds past the deadline a worker may take to finish its batch and record its trial
STOP_SIGNAL = signal.SIGUSR1  # from the command to its workers: stop after the batch (never an abort)


@dataclass
class WorkerSpec:
    """What a worker process needs from the command: picklable, no callbacks."""

    index: int
    context: SearchContext  # the command's, less its images and registry: the worker reads both again
    threads: int
    device: str
    verbosity: int  # Optuna's logging level in the command
    plugins_dir: str | None = None  # the command's --plugins-dir (AUTOFT_PLUGINS_DIR and AUTOFT_DISABLE_PLUGIN_AUTOLOAD pass in the environment)


@contextlib.contextmanager
def parallel_workers(session, target: Callable[[WorkerSpec, Any], None]) -> Iterator[None]:
    """Start ``session.ctx.jobs - 1`` processes running ``target(spec, events)`` for the block (the caller runs trials
    too, as worker 0, with its share of threads); wait for them when it ends."""
    if session.ctx.jobs <= 1:
        yield
        return
    threads = session.ctx.plan.threads or threads_per_job(session.ctx.jobs)  # the fastest count calibration measured, at most each worker's share
    context = multiprocessing.get_context("spawn")  # fork and torch's thread pools do not mix
    events = context.Queue()
    processes = [context.Process(target=target, args=(_spec(session, index, threads), events), name=f"autoft-worker-{index}") for index in range(1, session.ctx.jobs)]
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
        end = session.ctx.budget.end
        _wait(processes, None if end is None else end + JOIN_GRACE)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()  # past every grace: its trial is left RUNNING for the next run to recover
        events.put(None)
        forwarder.join(timeout=5.0)


def _spec(session, index: int, threads: int) -> WorkerSpec:
    ctx = session.ctx
    config = dataclasses.replace(ctx.config, jobs=1, on_event=None, pre_search=(), sampler=ctx.config.sampler if isinstance(ctx.config.sampler, str) else "tpe")
    space = dataclasses.replace(ctx.space, regularizer_objects={}, registry=None)  # the worker's own registry replaces it
    context = dataclasses.replace(ctx, config=config, space=space, registry=None, strategies=dict.fromkeys(ctx.strategies), data=None, pool=None, unlabelled=None, candidates=())
    device = str(ctx.device)
    if ctx.device.type == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{index % torch.cuda.device_count()}"
    from autoft import plugins

    return WorkerSpec(index=index, context=context, threads=threads, device=device, verbosity=optuna.logging.get_verbosity(), plugins_dir=plugins.default_plugins_dir())


def _forward(events, session) -> None:
    """The workers' trial results, shown by the command's display as its own."""
    while True:
        event = events.get()
        if event is None:
            return
        if isinstance(event, WorkerFailed):
            session.state.notes.append(f"worker {event.worker} stopped: {event.reason}")
        session.emit(event)


def _wait(processes: list, until: float | None) -> None:
    """Join the workers until ``until``; a stop asked of the command meanwhile is passed on to them."""
    from autoft.core.runtime import stop_requested

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
