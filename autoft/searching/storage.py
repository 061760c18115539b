"""Where a study lives, and how a crashed trial is found and run again.

The storage URL goes to Optuna unchanged where Optuna takes URLs:

* ``sqlite:///runs/x/study.db`` (the default, embedded) and ``postgresql://...`` (with
  ``pip install 'autoft[postgres]'``) or ``mysql://...`` for many machines: an
  :class:`optuna.storages.RDBStorage` with a heartbeat, so a trial whose worker vanished is
  failed and queued again by any worker. Workers started at the same moment on a new
  database race to create Optuna's tables; the losers open the storage again.
* ``journal:///path/journal.log`` or any path ending in ``.log``/``.jsonl``: an Optuna
  journal file, for several processes on one machine (``optuna-dashboard PATH`` opens it).

Whatever the storage, a trial records the host and process running it. A RUNNING trial
whose worker is gone is failed and queued again with the same parameters by the next worker
that looks, on any machine: on a database, once its heartbeat is older than the grace period
(``AUTOFT_HEARTBEAT_SECONDS``, ``AUTOFT_GRACE_SECONDS``; 60 s and 180 s); on any storage, at
once by a worker on its own host that finds its process ended (killed, out of memory, power
cut). A trial stopped with Ctrl-C, SIGTERM or by a full disk is queued again too. Retried
trials do not count towards ``--trials``. A crashed trial and its retries make one chain of
attempts: each attempt resumes from the newest failed one that saved a state
(:func:`resume_point`). ``AUTOFT_HOST`` names this machine in place of its hostname (a
container's hostname changes on every start).
"""

from __future__ import annotations

import contextlib
import copy
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
from autoft.searching.records import TrialRecord

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


class _Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry, less the process identity of the attempt it copies: until the retry's
    own process writes its identity, no worker may take it for a trial whose process died."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = TrialRecord.inherited(trial)
        super().__call__(study, trial)


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _Retry(max_retry=MAX_RETRIES)


def _journal_path(url: str) -> str | None:
    if url.startswith("journal://"):
        return url.removeprefix("journal://")
    return url if "://" not in url and url.endswith(JOURNAL_SUFFIXES) else None


def has_heartbeat(url: str) -> bool:
    """Whether trials in the storage at ``url`` send heartbeats (a database does, a journal does not)."""
    return _journal_path(url) is None


def heartbeat_seconds() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds, from the environment or the defaults."""
    values = []
    for name, default in (("AUTOFT_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS), ("AUTOFT_GRACE_SECONDS", GRACE_SECONDS)):
        text = os.environ.get(name, "").strip()
        try:
            values.append(int(text) if text else default)
        except ValueError:
            raise AutoftError(f"{name}={text!r}: give whole seconds") from None
        if values[-1] < 1:
            raise AutoftError(f"{name} must be at least 1 second")
    interval, grace = values
    if grace <= interval:
        raise AutoftError(f"AUTOFT_GRACE_SECONDS ({grace}) must be longer than the heartbeat interval ({interval})")
    return interval, grace


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; see the module docstring for the forms accepted."""
    retry = _retry_callback()
    journal = _journal_path(url)
    if journal is not None:
        path = Path(journal).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise AutoftError(f"--storage {url!r}: use sqlite:///FILE, postgresql://..., journal:///FILE or a FILE.log journal")
    if url.startswith("sqlite:///"):
        database = Path(url.removeprefix("sqlite:///")).expanduser()
        database.parent.mkdir(parents=True, exist_ok=True)
        check_sqlite(database)
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


def check_sqlite(path: Path) -> None:
    """A damaged SQLite study fails in one line naming the file and the way out, before Optuna
    meets it (its message would blame "invalid data in the commit, e.g. exceeding max length")."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
            found = [row[0] for row in connection.execute("PRAGMA quick_check(3)").fetchall()]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return  # another worker is writing it: it was readable a moment ago
        found = [str(exc)]
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        found = [str(exc)]
    if found != ["ok"]:
        lines = [line.strip() for line in "\n".join(found).splitlines() if line.strip() and not line.startswith("***")]
        raise AutoftError(
            f"the study database {path} is damaged ({(lines or ['unreadable'])[0][:200]}); move it aside to start a new study "
            f"(mv {path} {path}.damaged), or save what it still holds with: sqlite3 {path} .recover | sqlite3 {path.with_suffix('.recovered.db')}"
        )


def _rdb_storage(url: str, retry: RetryHeartbeatStaleTrialCallback) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat options
        interval, grace = heartbeat_seconds()
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=interval,
            grace_period=grace,
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
    host = os.environ.get("AUTOFT_HOST", "").strip() or socket.gethostname()
    return {"host": host, "pid": os.getpid(), "pid_started": _start_time(os.getpid())}


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
    record = TrialRecord.of(trial)
    if record.host != me["host"] or record.pid is None:
        return False
    return not _process_alive(int(record.pid), record.pid_started)


# ---------------------------------------------------------------------------
# Recovering trials left behind


def lost_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker is gone: on any host, those whose heartbeat is older
    than the grace period (Optuna's ``fail_stale_trials``, which also queues them again); on
    this host, those whose process no longer runs, at once (a journal has no heartbeat),
    queued again here. Returns the numbers of those failed here."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    me = process_identity()
    trials = study.get_trials(deepcopy=False)
    failed = [t.number for t in trials if t.number in running and t.state == TrialState.FAIL]  # stale, and queued again by Optuna
    for trial in (t for t in trials if t.state == TrialState.RUNNING):
        if owner_is_gone(trial, me):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                continue  # another worker got there first
            _retry_callback()(study, trial)
            failed.append(trial.number)
    return failed


def recover_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker is gone (:func:`lost_trials`: they are queued again at
    once), and queue every trial that died by a crash or an interrupt again with its parameters.
    Returns the numbers queued here."""
    queued = lost_trials(study)
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    retry = _retry_callback()
    for trial in trials:
        if TrialRecord.of(trial).to_rerun(trial) and trial.number not in done:
            retry(study, trial)
            queued.append(trial.number)
    return queued


def running_elsewhere(study: optuna.Study, heartbeat: bool) -> list[FrozenTrial]:
    """RUNNING trials of other processes that a worker can wait on: every one that its process
    has claimed (its identity written, after Optuna started its heartbeat) when the storage has a
    ``heartbeat`` (a dead one turns stale), else those of live processes on this host."""
    me = process_identity()
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = TrialRecord.of(trial)
        if record.pid is None or (record.host, record.pid) == (me["host"], me["pid"]):
            continue
        if heartbeat or (record.host == me["host"] and not owner_is_gone(trial, me)):
            found.append(trial)
    return found


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that were queued again (Optuna records them on each retry)."""
    return {n for t in trials for n in TrialRecord.of(t).retry_history}


def retry_chains(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """Trials by the number of the original they run again: each chain is a crashed trial and
    its retries, oldest first."""
    chains: dict[int, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        origin = TrialRecord.of(t).retry_of
        chains.setdefault(t.number if origin is None else origin, []).append(t)
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
        if last.state in (TrialState.RUNNING, TrialState.WAITING) or TrialRecord.of(last).to_rerun(last):
            point = resume_point(attempts, math.inf, has_state)
            if point is not None:
                awaited.add(point)
    return awaited


def counted_trials(trials: list[FrozenTrial], retried: set[int] | None = None) -> int:
    """Trials that count towards ``--trials``: finished ones that were not queued again,
    crashed ones still to be retried excluded, plus those running now. Surplus trials (never
    trained) and trials failed by a mistake in the command do not count. ``retried``: the
    numbers queued again, when ``trials`` is a part of the study."""
    retried = retried_numbers(trials) if retried is None else retried
    count = 0
    for t in trials:
        record = TrialRecord.of(t)
        if record.surplus or record.user_error:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            count += 1
        elif t.state == TrialState.FAIL and t.number not in retried and not record.to_rerun(t):
            count += 1
    return count


def is_surplus(number: int, trials: list[FrozenTrial], total: int) -> bool:
    """Whether trial ``number`` would take the study past ``total``: the trials numbered before
    it (running ones included) already count that many, with every crashed trial's retry still
    queued, whatever its number. Workers sharing a study each start a trial before they learn of
    the others', so this is checked when a trial starts, not after. A retry goes before any
    recipe queued earlier (Optuna runs queued trials oldest first): a recipe that workers
    started together each queued, or a resumed search's, must not take the place of a trial
    that was lost, which resumes from its saved state."""
    retried = retried_numbers(trials)
    queued = [t for t in trials if t.state == TrialState.WAITING and t.number != number and TrialRecord.of(t).retry_of is not None]  # WAITING: none counted yet
    return counted_trials([t for t in trials if t.number < number], retried=retried) + len(queued) >= total
