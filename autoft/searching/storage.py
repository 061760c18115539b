"""Where a study lives, and how a crashed trial is found and run again.

The storage URL goes to Optuna unchanged where Optuna takes URLs:

* ``sqlite:///runs/x/study.db`` (the default, embedded) and ``postgresql://...`` (with
  ``pip install 'autoft[postgres]'``) or ``mysql://...`` for many machines: an
  :class:`optuna.storages.RDBStorage` with a heartbeat, so a trial whose worker vanished is
  failed and queued again by any worker. Workers started at the same moment on a new
  database race to create Optuna's tables; the losers open the storage again.
* ``journal:///path/journal.log`` or any path ending in ``.log``/``.jsonl``: an Optuna
  journal file, for several processes on one machine (``optuna-dashboard PATH`` opens it).

Whatever the storage, a trial records the host and process running it. When the same
host starts a search again, a RUNNING trial whose process is gone (killed, out of memory,
power cut) is failed with that reason and queued again with the same parameters; a trial
stopped with Ctrl-C or by a full disk is queued again too. Retried trials do not count
towards ``--trials``. A crashed trial and its retries make one chain of attempts: each
attempt resumes from the newest failed one that saved a state (:func:`resume_point`).
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autoft.errors import AutoftError

HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180  # a long eval or checkpoint write must not count as death
MAX_RETRIES = 3
CREATE_ATTEMPTS = 8  # opening a storage that another worker is creating: at most about 12 s of waits
JOURNAL_SUFFIXES = (".log", ".jsonl")


def default_storage_url(out: Path, jobs: int = 1) -> str:
    """The study's storage in ``out``: the one a previous run left there, else an SQLite
    file for one worker and a journal file (safe for many processes) for several."""
    database, journal = (out / "study.db").resolve(), (out / "study.log").resolve()
    if journal.exists() or (jobs > 1 and not database.exists()):
        return f"journal://{journal}"
    return f"sqlite:///{database}"


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; see the module docstring for the forms accepted."""
    retry = _retry_callback()
    journal = url.removeprefix("journal://") if url.startswith("journal://") else None
    if journal is None and "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        journal = url
    if journal is not None:
        path = Path(journal).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise AutoftError(f"--storage {url!r}: use sqlite:///FILE, postgresql://..., journal:///FILE or a FILE.log journal")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            return _rdb_storage(url, retry)
        except ImportError as exc:
            raise AutoftError(f"--storage {url}: a database driver is missing ({_first_line(exc)}); {_driver_hint(url)}") from None
        except Exception as exc:  # sqlalchemy's errors for unreachable servers, bad URLs, and the race below
            attempt += 1
            if attempt == CREATE_ATTEMPTS or not _lost_creation_race(exc):
                raise AutoftError(f"cannot open storage {url}: {type(exc).__name__}: {_first_line(exc)}") from None
            time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))  # jittered, so the losers do not collide again


def _rdb_storage(url: str, retry: RetryHeartbeatStaleTrialCallback) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat options
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=retry,
            # SQLite: wait for another writer instead of failing at once.
            engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None,
        )


def _lost_creation_race(exc: Exception) -> bool:
    """Whether another worker created Optuna's tables (or its version row) at the same moment.

    Workers started together on a new database all find no tables, and all but one fail to
    create them: PostgreSQL with a unique violation on its catalogue, SQLite and MySQL with
    "already exists". The tables exist by then, so opening the storage again succeeds.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, (OperationalError, ProgrammingError)) and "already exists" in str(exc)


def _driver_hint(url: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme == "postgresql":
        return "install it with: pip install 'autoft[postgres]'"
    if scheme == "mysql":
        return "install one with pip (PyMySQL, and mysql+pymysql:// in the URL)"
    return "install the one the URL names with pip"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def storage_folder(url: str) -> Path | None:
    """The local folder holding the storage's file (SQLite, journal); None for a database server."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://")).expanduser().parent
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).expanduser().parent
    return None if "://" in url else Path(url).expanduser().parent


# ---------------------------------------------------------------------------
# Which process runs a trial


def process_identity() -> dict[str, Any]:
    """This process, as trials record it: host, pid, and the pid's start time where known,
    so that a recycled pid is not mistaken for the original process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _start_time(os.getpid())}


def _start_time(pid: int) -> int | None:
    try:
        # Field 22 of /proc/PID/stat, after the parenthesised command name that may hold spaces.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return started is None or _start_time(pid) in (None, started)


def owner_is_gone(trial: FrozenTrial, me: dict[str, Any]) -> bool:
    """Whether a RUNNING trial belongs to a process on this host that no longer runs."""
    attrs = trial.user_attrs
    if attrs.get("host") != me["host"] or "pid" not in attrs:
        return False
    return not _process_alive(int(attrs["pid"]), attrs.get("pid_started"))


# ---------------------------------------------------------------------------
# Recovering trials left behind


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that were queued again (Optuna records them on the retry)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def recover_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose process on this host is gone, and queue every trial that
    died by a crash or an interrupt again with its parameters. Returns the queued numbers."""
    me = process_identity()
    storage = study._storage  # Optuna offers no public way to fail another process's trial
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_is_gone(trial, me):
            try:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"process {trial.user_attrs['pid']} on {me['host']} ended while the trial ran")
                storage.set_trial_user_attr(trial._trial_id, "crashed", True)
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    retry = _retry_callback()
    queued = []
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("crashed") and trial.number not in done:
            retry(study, trial)
            queued.append(trial.number)
    return queued


def retry_chains(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """Trials by the number of the original they run again (Optuna records it on every retry
    as ``failed_trial``): each chain is a crashed trial and its retries, oldest first."""
    chains: dict[int, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        chains.setdefault(t.system_attrs.get("failed_trial", t.number), []).append(t)
    return chains


def resume_point(attempts: list[FrozenTrial], before: float, has_state: Callable[[int], bool]) -> int | None:
    """The attempt an attempt numbered ``before`` resumes from: the newest failed one before it that left a state."""
    return max((t.number for t in attempts if t.number < before and t.state == TrialState.FAIL and has_state(t.number)), default=None)


def awaited_states(trials: list[FrozenTrial], has_state: Callable[[int], bool]) -> set[int]:
    """Failed attempts whose saved state a retry, queued, running or still to be queued, will resume from."""
    awaited = set()
    for attempts in retry_chains(trials).values():
        last = attempts[-1]
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in attempts):
            continue  # the chain ran to its end: no attempt will run again
        if last.state in (TrialState.RUNNING, TrialState.WAITING) or (last.state == TrialState.FAIL and last.user_attrs.get("crashed")):
            point = resume_point(attempts, math.inf, has_state)
            if point is not None:
                awaited.add(point)
    return awaited


def counted_trials(trials: list[FrozenTrial]) -> int:
    """Trials that count towards ``--trials``: finished ones that were not queued again,
    crashed ones still to be retried excluded, plus those running now."""
    retried = retried_numbers(trials)
    count = 0
    for t in trials:
        if t.user_attrs.get("surplus"):
            continue  # started past the total by a worker that learnt of the others too late; never trained
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            count += 1
        elif t.state == TrialState.FAIL and t.number not in retried and not t.user_attrs.get("crashed"):
            count += 1
    return count


def is_surplus(number: int, trials: list[FrozenTrial], total: int) -> bool:
    """Whether trial ``number`` would take the study past ``total``: the trials numbered before
    it (running ones included) already count that many. Workers sharing a study each start a
    trial before they learn of the others', so this is checked when a trial starts, not after."""
    return counted_trials([t for t in trials if t.number < number]) >= total
