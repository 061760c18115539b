"""`autoft search --jobs N`: N trials at once, as worker processes on one study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoft.searching.planning import DataShape, Overrides, Throughput, make_plan
from autoft.searching.storage import counted_trials, open_storage
from autoft.core.runtime import threads_per_job
from conftest import COLOURS, make_image

STUDY = "jobs"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12):
            make_image(root / name / f"{i}.png", colour, seed=100 * c + i, size=16)
    return root


def _args(folder: Path, out: Path, *extra: str, epochs: int = 20) -> list[str]:
    return [sys.executable, "-c", "from autoft.cli import main; main()", "search", "--backbone", "test_resnet", "--data", str(folder), "--out", str(out),
            "--study", STUDY, "--epochs", str(epochs), "--image-size", "16", "--batch-size", "8", "--no-cv", "--no-onnx", "--device", "cpu", "--weights", "scratch", *extra]  # fmt: skip


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=open_storage(str(out / "study.log"))).get_trials(deepcopy=False)


def _overlap(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


def test_two_jobs_run_trials_at_once_in_two_processes_and_stop_at_the_total(folder, tmp_path):
    out = tmp_path / "run"
    # Trials long enough (a few seconds) that the worker, started after the command's own first trial, gets some.
    done = subprocess.run(_args(folder, out, "--jobs", "2", "--trials", "6", epochs=60), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    trials = _trials(out)  # a journal file: several processes may write the study
    assert counted_trials(trials) == 6 and len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len({t.user_attrs["pid"] for t in finished}) == 2  # the command's process and one worker
    assert {t.user_attrs["threads"] for t in finished} == {threads_per_job(2)}  # the cores divided, not oversubscribed
    assert any(_overlap(a, b) for a in finished for b in finished if a.user_attrs["pid"] != b.user_attrs["pid"])  # at the same time
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["plan"]["jobs"] == 2 and "2 at a time" in metrics["plan"]["line"]
    assert (out / "best" / "model.pt").is_file() and (out / "report.html").is_file()
    for t in finished:  # the workers' trials are shown by the command, as its own
        assert f"trial {t.number}: " in done.stdout + done.stderr


def test_ctrl_c_stops_every_worker_and_a_rerun_finishes_the_search(folder, tmp_path):
    out = tmp_path / "run"
    args = _args(folder, out, "--jobs", "2", "--trials", "4", epochs=60)  # trials long enough to be caught running together
    # Its own session, as a terminal's foreground job: Ctrl-C goes to the whole process group.
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    running: list = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(running) < 2:
            assert child.poll() is None, child.stderr.read()[-3000:]
            if (out / "study.log").exists():
                running = [t for t in _trials(out) if t.state == TrialState.RUNNING and "pid" in t.user_attrs]
            time.sleep(0.1)
        assert len(running) == 2, "two trials never ran at once"
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode != 0
    for pid in {t.user_attrs["pid"] for t in running}:  # no worker goes on training alone
        assert not _alive(pid)

    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(out)
    assert counted_trials(trials) == 4 and not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == "interrupted"]
    assert interrupted and all(any(r.system_attrs.get("failed_trial") == t.number for r in trials) for t in interrupted)  # each ran again
    assert (out / "best" / "model.pt").is_file()


def test_a_worker_dies_with_a_killed_command(folder, tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen(_args(folder, out, "--jobs", "2", "--trials", "8"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not workers:
            assert child.poll() is None, child.stderr.read()[-3000:]
            if (out / "study.log").exists():
                workers = {t.user_attrs.get("pid") for t in _trials(out) if t.state == TrialState.RUNNING} - {child.pid, None}
            time.sleep(0.1)
        assert workers, "no worker process ever ran a trial"
        child.kill()
    finally:
        child.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_plan_holds_as_many_more_fits_as_jobs():
    data = DataShape(labelled=2000, val=400, smallest_class=200, smallest_val_class=40)
    rates = {32: Throughput(32, train=500.0, evaluate=2000.0)}
    one, two = (make_plan(data, rates, 600.0, Overrides(epochs=5), jobs=jobs) for jobs in (1, 2))
    assert one.steps == two.steps and two.expected_trials >= 2 * one.expected_trials - 1
    short = DataShape(labelled=2000, val=400, smallest_class=200, smallest_val_class=40)
    one, two = (make_plan(short, rates, 220.0, jobs=jobs) for jobs in (1, 2))
    assert one.default_steps == two.default_steps  # the default fit runs alone, at full strength either way
    assert two.search and not one.search  # two trials at a time buy a search that one at a time cannot
