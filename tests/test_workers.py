"""Many workers, one study: `autoft search` processes started at the same moment on one PostgreSQL
study, as a user starts machines for a distributed search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoft.searching.records import TrialRecord
from autoft.searching.storage import counted_trials, open_storage
from conftest import COLOURS, make_image

TOTAL = 5
HEARTBEAT = {"AUTOFT_HEARTBEAT_SECONDS": "1", "AUTOFT_GRACE_SECONDS": "15"}  # a killed worker's trial turns stale in seconds; three busy workers on two cores may lag a few


def _folder(root: Path) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12):
            make_image(root / name / f"{i}.png", colour, seed=100 * c + i, size=16)
    return root


def _worker(data: Path, url: str, out: Path) -> subprocess.Popen:
    args = ["search", "--backbone", "test_resnet", "--data", str(data), "--out", str(out), "--storage", url, "--study", "shared",
            "--trials", str(TOTAL), "--epochs", "2", "--image-size", "16", "--batch-size", "8", "--no-cv", "--no-onnx", "--device", "cpu", "--weights", "scratch"]  # fmt: skip
    env = {**os.environ, **HEARTBEAT}
    return subprocess.Popen([sys.executable, "-c", "from autoft.cli import main; main()", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_three_workers_started_together_run_exactly_the_total_and_survive_a_kill(postgres_url, tmp_path):
    data = _folder(tmp_path / "colours")
    workers = [_worker(data, postgres_url, tmp_path / f"out{i}") for i in range(3)]

    def training() -> set[int]:
        try:
            study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url))
            return {TrialRecord.of(t).pid for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        except Exception:  # the study is not created yet
            return set()

    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:  # kill -9 a worker while it trains a trial: the first seen doing so
        running = training()  # one look at the storage for all three workers
        seen = next((w for w in workers if w.pid in running and w.poll() is None), None)
        if seen is not None:
            os.kill(seen.pid, signal.SIGSTOP)  # stopped, it cannot finish the trial between this look and the kill
            if seen.pid in training():
                victim = seen
                break
            os.kill(seen.pid, signal.SIGCONT)  # it finished that trial meanwhile: look again
        assert any(w.poll() is None for w in workers), "every worker ended before one was seen training a trial"
        time.sleep(0.05)
    assert victim is not None, "no worker was seen training a trial in 300 s"
    victim.kill()
    survivors = [w for w in workers if w is not victim]
    for worker in survivors:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    victim.wait()

    trials = optuna.load_study(study_name="shared", storage=open_storage(postgres_url)).get_trials()
    assert counted_trials(trials) == TOTAL  # not one more for each extra worker
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no trial recorded twice
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # the killed worker's trial too: failed once stale
    table = [(t.number, t.state.name, TrialRecord.of(t).pid, TrialRecord.of(t).retry_of, TrialRecord.of(t).surplus) for t in trials]
    lost = [t for t in trials if t.state == TrialState.FAIL and TrialRecord.of(t).pid == victim.pid]
    assert lost, table
    for trial in lost:  # and run again by a survivor
        assert [TrialRecord.of(t).pid in {w.pid for w in survivors} for t in trials if TrialRecord.of(t).retry_of == trial.number] == [True], (table, [w.pid for w in workers])
    for i, worker in enumerate(workers):  # each surviving worker published a whole best/ of the study's best trial
        if worker is victim:
            continue
        metrics = json.loads((tmp_path / f"out{i}" / "best" / "metrics.json").read_text())
        assert metrics["study"] == "shared" and (tmp_path / f"out{i}" / "best" / "model.pt").is_file()
        assert not list((tmp_path / f"out{i}").glob(".best.*"))
