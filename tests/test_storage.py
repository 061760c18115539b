"""Study storages on a real PostgreSQL server: the driver's extra, and workers started at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autoft.errors import AutoftError
from autoft.searching.storage import open_storage

# Each worker imports everything first, says so, then waits for the go file to open the
# storage: the moment N machines started together by a scheduler would all reach it.
WORKER = """
import os, sys
import optuna
from autoft.searching.storage import open_storage

url, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    pass
storage = open_storage(url)
study = optuna.create_study(study_name="race", storage=storage, load_if_exists=True, direction="maximize")
print("opened", study.study_name, flush=True)
"""


def start_together(url: str, count: int, go: Path) -> list[subprocess.Popen]:
    """``count`` worker processes that open the storage at ``url`` at the same moment."""
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    for worker in workers:
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()[-3000:]
    go.touch()
    return workers


# Without the retry, a worker lost the race on creating the tables in 3 of 3 such starts.
@pytest.mark.parametrize("round_", range(2))
def test_workers_started_at_the_same_moment_on_a_new_database_all_open_the_storage(postgres_url, tmp_path, round_):
    workers = start_together(postgres_url, 3, tmp_path / "go")
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
        assert out.strip() == "opened race"
    assert [s.study_name for s in open_storage(postgres_url).get_all_studies()] == ["race"]


def test_a_postgresql_study_keeps_its_trials(postgres_url):
    study = optuna.create_study(study_name="kept", storage=open_storage(postgres_url), direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    again = optuna.load_study(study_name="kept", storage=open_storage(postgres_url))
    assert [t.value for t in again.trials] == [t.value for t in study.trials] and len(again.trials) == 3


def test_a_missing_postgresql_driver_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # importing it now fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(AutoftError, match=r"pip install 'autoft\[postgres\]'") as caught:
        open_storage("postgresql://someone@127.0.0.1:1/study")
    assert "\n" not in str(caught.value)


def test_an_unreachable_server_is_one_line_and_not_retried_for_long():
    started = time.monotonic()
    with pytest.raises(AutoftError, match="cannot open storage") as caught:
        open_storage("postgresql://someone@127.0.0.1:1/study")
    assert "\n" not in str(caught.value)
    assert time.monotonic() - started < 10
