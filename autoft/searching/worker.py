"""A ``--jobs`` worker process: the command's search context, its own trials on the same study.

Started by :func:`autoft.searching.workers.parallel_workers`. It reads the images again
(from the decode cache), takes everything else from the command's frozen
:class:`~autoft.searching.session.SearchContext`, and runs :func:`run_trials` until the
study's cap or the budget's end, reporting each trial to the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import optuna
import torch

from autoft import plugins
from autoft.errors import AutoftError
from autoft.core.events import TrialEnd, WorkerFailed
from autoft.core.runtime import graceful_interrupts, request_stop
from autoft.searching.preparing import prepare_worker
from autoft.searching.trials import configure_study, run_trials
from autoft.searching.workers import STOP_SIGNAL, WorkerSpec


def worker_main(spec: WorkerSpec, events) -> None:
    """Run trials until the study's cap or the deadline; report each to the command."""
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
    session = prepare_worker(spec.context, spec.index, spec.device, plugins.registry())
    configure_study(session)
    session.state.on_event = lambda event: events.put(event) if isinstance(event, TrialEnd) else None
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
