"""autoft search: the study's contents, pruning, failures, resume after a kill, best model, CLI."""

from __future__ import annotations

import errno
import html
import json
import os
import signal
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

from autoft.cli import make_app
from autoft.errors import AutoftError
from autoft.searching import SearchSpace, default_study_name, load_overrides, parse_duration, search
from autoft.core.io import file_lock
from autoft.searching.objective import CLEANUP_LOCK, STATE_NAME, retried_from, take_over_state
from autoft.searching.records import TrialRecord
from autoft.searching.trials import prune_trial_folders
from autoft.searching.storage import open_storage, recover_trials
from autoft.core.events import EpochEnd, TrialEvent
from autoft.model.recipe import default_params
from autoft.model.checkpoints import load_checkpoint

BASE = {"lr", "dropout", "weight_decay", "strategy", "freeze_depth"}
EPOCHS = 3


from conftest import NOISY_COLOURS as COLOURS


def _search(folder: Path, out: Path, trials: int):
    # lr choices: the default recipe's 1e-3, or 1e-6, which learns nothing in 3 epochs
    # and must be pruned; freeze depths above 5 (test_resnet has 6 groups with the head)
    # are bad hyperparameters that make a trial fail. Seed 0 draws both among the first six
    # trials of today's search space (a sampler draws anew whenever the space changes).
    return search(
        "test_resnet", str(folder), out, trials=trials, epochs=EPOCHS, image_size=16, device="cpu", seed=0, batch_size=8,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        ranges=["lr=0.000001,0.001", "freeze_depth=0:12"], no_cv=True, ensemble=1, simple_models=False,
    )


@pytest.fixture(scope="module")
def searched(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    result = _search(image_folder, out, trials=7)
    storage = open_storage(result.storage)
    first = {t.number: t for t in optuna.load_study(study_name=result.study_name, storage=storage).get_trials()}
    return result, first


def _trials(result) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage)).get_trials()


def test_study_holds_parameters_and_per_epoch_values(searched):
    result, trials = searched
    assert trials[0].params == {**default_params(), "freeze_depth": 0, "lr": 0.001}
    # then strong, different recipes: the default shifted instead of cropped, then with mixup
    assert trials[1].params == {**trials[0].params, "augment": "shift"} and trials[1].user_attrs["recipe"] == "portfolio"
    assert trials[2].params["regularizer"] == "mixup" and trials[2].user_attrs["recipe"] == "portfolio"
    assert trials[0].user_attrs["recipe"] == "default"
    ran = [t for t in trials.values() if t.state != TrialState.FAIL]
    for t in ran:
        assert BASE <= set(t.params)
        assert ("l2sp_alpha" in t.params) == (t.params["strategy"] == "l2sp")  # conditional on the strategy
        assert t.user_attrs["host"] and t.user_attrs["pid"] == os.getpid()
    for t in ran:
        if t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == list(range(1, EPOCHS + 1))
            assert [r["epoch"] for r in t.user_attrs["history"]] == list(range(1, EPOCHS + 1))
    assert result.best_value >= trials[0].value  # never worse than the defaults


def test_pruner_stops_poor_trials_early(searched):
    _, trials = searched
    pruned = [t for t in trials.values() if t.state == TrialState.PRUNED]
    assert pruned, {t.number: (t.state.name, t.params["lr"]) for t in trials.values()}
    assert all(len(t.intermediate_values) < EPOCHS for t in pruned)
    assert all(t.state != TrialState.COMPLETE for t in trials.values() if t.params["lr"] == 1e-6)


def test_a_failing_trial_is_recorded_and_the_search_goes_on(searched):
    result, trials = searched
    failed = [t for t in trials.values() if t.state == TrialState.FAIL]
    assert failed
    assert all(any(m in t.user_attrs["fail_reason"] for m in ("freeze depth must be within 0..6", "no parameter to train")) for t in failed)
    assert max(trials) > min(t.number for t in failed)  # trials ran after the failure
    assert result.states["FAIL"] == len(failed)


def test_only_the_best_trial_keeps_its_checkpoint(searched):
    result, _ = searched
    assert [p.name for p in (result.out / "trials").iterdir()] == [str(result.best_number)]
    assert not list(result.out.glob(".best.*"))  # the staging folder was swapped in, not left behind


def test_best_model_onnx_runs_in_onnxruntime_and_agrees_with_pytorch(searched, image_folder):
    result, _ = searched
    best = result.best_dir
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["trial"] == result.best_number and metrics["value"] == pytest.approx(result.best_value)
    assert metrics["model"]["refit"]["images"] == 96  # best/ was trained again on every labelled image
    assert metrics["selection"] == "a validation split of 19 images"
    assert [b["name"] for b in metrics["baselines"]] == ["logistic regression on pixels", "linear probe on random test_resnet features"]
    assert metrics["summary"].startswith(f"best {result.best_value:.4f}")
    assert json.loads((best / "labels.json").read_text()) == sorted(COLOURS)
    preprocess = json.loads((best / "preprocess.json").read_text())
    assert preprocess["image_size"] == 16 and preprocess["layout"] == "NCHW" and len(preprocess["mean"]) == len(preprocess["std"]) == 3
    check = metrics["onnx_check"]["fp32"]
    assert all(c["top1_agreement"] == 1.0 and c["max_abs_diff"] < 1e-3 for c in check.values())

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((16, 16)))).permute(2, 0, 1) for p in sorted(image_folder.glob("*/0.png"))]).float() / 255
    session = ort.InferenceSession(str(best / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.inference_mode():
        expected = load_checkpoint(best).network()(pixels).numpy()
    assert got.shape == (4, 4)  # a batch of 4 through a dynamic batch dimension
    assert np.abs(got - expected).max() < 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_report_holds_the_plots(searched):
    result, trials = searched
    page = result.report.read_text()
    for title in ("Optimisation history", "Parameter importances", "Learning curves of the best trials", "Confusion matrix of the best model", "Best hyperparameters", "Trials"):
        assert f"<h2>{title}</h2>" in page
    assert page.count("<svg") >= 4
    assert not any(fetch in page for fetch in ('src="http', "<link", "<script src", "@import", "url(http"))  # nothing to fetch: the one script is inline
    assert html.escape([t for t in trials.values() if t.state == TrialState.FAIL][0].user_attrs["fail_reason"]) in page  # the failure reason is in the trials table


def test_rerun_adds_trials_and_loses_none(searched, image_folder):
    result, first = searched
    again = _search(image_folder, result.out, trials=9)
    trials = {t.number: t for t in _trials(again)}
    for number, before in first.items():
        assert trials[number].state == before.state and trials[number].params == before.params and trials[number].value == before.value
    assert len(trials) == len(first) + 2
    assert again.best_value >= result.best_value


def test_weights_start_every_trial(image_folder, tmp_path):
    from autoft.model.backbones import build_backbone

    source = build_backbone("test_resnet", num_classes=3)
    torch.save(source.model.state_dict(), tmp_path / "start.pt")
    # freeze_depth 5 leaves only the head training: everything else must be the file's
    result = search(
        "test_resnet", str(image_folder), tmp_path / "run", trials=2, epochs=1, image_size=16, device="cpu", batch_size=16,
        strategies=["freeze"], ranges=["freeze_depth=5", "regularizer=none"], weights=str(tmp_path / "start.pt"), export_onnx=False, no_cv=True,
        simple_models=False,
    )
    best = load_checkpoint(result.best_dir).backbone
    head = set(best.head.params)
    for name, tensor in source.model.state_dict().items():
        if name.rpartition(".")[0] + ".weight" not in head and name not in head:
            assert torch.equal(best.model.state_dict()[name], tensor), name
    with pytest.raises(AutoftError, match="weights"):  # a rerun from other weights is another search
        search("test_resnet", str(image_folder), tmp_path / "run", trials=3, epochs=1, image_size=16, device="cpu", export_onnx=False)


def _one_trial_args(folder: Path, out: Path, epochs: int = 4, *extra: str) -> list[str]:
    """``autoft search`` of one small trial on ``folder``, without ONNX."""
    return ["search", "--backbone", "test_resnet", "--data", str(folder), "--out", str(out), "--trials", "1", "--epochs", str(epochs), "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--no-onnx", "--no-cv", *extra]


def _start_search(args: list[str], prelude: str = "") -> subprocess.Popen:
    """``autoft search`` in a process of its own, which runs ``prelude`` (Python) first."""
    env = {**os.environ, "AUTOFT_STATE_INTERVAL": "0"}  # write the resumable state after every evaluation
    return subprocess.Popen([sys.executable, "-c", f"{prelude}\nfrom autoft.cli import main; main()", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _study_trials(folder: Path, out: Path) -> list[optuna.trial.FrozenTrial]:
    study_name = default_study_name("test_resnet", str(folder))
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'study.db'}").get_trials()


# Run first in an ``autoft search`` process: after saving its second training state it waits, its
# trial running with the first evaluation reported, so that a test can kill it from outside then
# (the whole trial takes under a second: a poll of the study could miss it).
WAITS_AFTER_TWO_STATES = """
import time
from autoft.training import trainer

save, saved = trainer.save_training_state, []

def save_then_wait(path, state):
    save(path, state)
    saved.append(path)
    if len(saved) == 2:
        time.sleep(120)

trainer.save_training_state = save_then_wait
"""


def test_killed_search_reruns_the_interrupted_trial(image_folder, tmp_path):
    out = tmp_path / "killed"
    args = _one_trial_args(image_folder, out)
    child = _start_search(args, WAITS_AFTER_TWO_STATES)
    study_name = default_study_name("test_resnet", str(image_folder))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            if (out / "study.db").exists():
                try:
                    running = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'study.db'}").get_trials(states=(TrialState.RUNNING,))
                except (KeyError, Exception):
                    running = []
                if running and running[0].intermediate_values:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("the search never reported an epoch")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed = running[0]

    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    trials = _study_trials(image_folder, out)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # no RUNNING zombie
    assert f"process {child.pid}" in TrialRecord.of(trials[0]).reason(trials[0])  # failed from outside: the record says by whom
    assert trials[1].params == killed.params and trials[1].system_attrs["failed_trial"] == killed.number
    # it continued after the killed trial's last finished epoch instead of starting over
    assert trials[1].user_attrs["resumed_from"]["trial"] == killed.number
    assert trials[1].user_attrs["resumed_from"]["epoch"] >= len(killed.intermediate_values)
    for epoch, value in killed.intermediate_values.items():
        assert trials[1].intermediate_values[epoch] == value
    assert not (out / "trials" / str(killed.number)).exists()  # resumed from, then cleaned up
    assert (out / "best" / "model.pt").is_file() and not (out / "best" / "model.onnx").exists()
    assert "running again trial(s) 0" in result.output


def test_an_interrupted_trial_runs_again_on_the_next_run(image_folder, tmp_path):
    def ctrl_c(event):
        if isinstance(event, TrialEvent) and isinstance(event.event, EpochEnd):
            raise KeyboardInterrupt

    run = dict(trials=1, epochs=1, image_size=16, device="cpu", batch_size=16, export_onnx=False, no_cv=True)
    with pytest.raises(KeyboardInterrupt):
        search("test_resnet", str(image_folder), tmp_path, on_event=ctrl_c, **run)
    assert (tmp_path / "report.html").is_file()  # a report even for an interrupted search
    result = search("test_resnet", str(image_folder), tmp_path, **run)
    interrupted, rerun = _trials(result)
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["fail_reason"] == "interrupted"
    assert rerun.state == TrialState.COMPLETE and rerun.params == interrupted.params and result.queued_again == [0]


# Run first in an ``autoft search`` process: it kills itself (kill -9, no cleanup) right
# after saving its {n}th training state.
KILLED_AFTER_STATES = """
import os, signal
from autoft.training import trainer

save, saved = trainer.save_training_state, []

def save_then_die(path, state):
    save(path, state)
    saved.append(path)
    if len(saved) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.save_training_state = save_then_die
"""


def test_a_trial_killed_twice_resumes_from_its_second_attempt_and_leaves_no_superseded_folder(image_folder, tmp_path):
    out = tmp_path / "twice"
    args = _one_trial_args(image_folder, out, 3, "--no-refit")
    for states in (1, 1):  # attempt 0 dies after evaluation 1; attempt 1 resumes there and dies after evaluation 2
        child = _start_search(args, KILLED_AFTER_STATES.format(n=states))
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["1"]  # attempt 1 took attempt 0's folder over

    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    first, second, third = _study_trials(image_folder, out)
    assert [t.state for t in (first, second, third)] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert second.system_attrs["failed_trial"] == third.system_attrs["failed_trial"] == 0 and third.params == first.params
    assert second.user_attrs["resumed_from"] == {"trial": 0, "epoch": 1}
    assert third.user_attrs["resumed_from"] == {"trial": 1, "epoch": 2}  # the second attempt's progress, not the first's
    assert [r["epoch"] for r in third.user_attrs["history"]] == [1, 2, 3] and third.user_attrs["history"][:1] == second.user_attrs["history"]
    assert not first.intermediate_values and third.intermediate_values[1] == second.intermediate_values[1]
    assert not TrialRecord.of(third).crashed and not TrialRecord.of(third).fail_reason  # not the attributes Optuna copied from its crashed attempt
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["2"]  # the superseded attempts' folders are gone


def _error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_trial_that_finds_the_disk_full_ends_the_search_in_one_line_and_a_rerun_resumes_it(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "full"
    args = _one_trial_args(image_folder, out, 2, "--no-refit")
    monkeypatch.setenv("AUTOFT_STATE_INTERVAL", "0")
    save, states = torch.save, []

    def save_until_the_disk_fills(obj, f, *rest, **options):
        if Path(f).parent == out / "trials" / "0" and Path(f).name.startswith(f".{STATE_NAME}."):
            states.append(f)
            if len(states) == 2:  # the state of evaluation 2 meets a full disk
                Path(f).write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *rest, **options)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert line.startswith("error: no space left on ") and f"could not write {out / 'trials' / '0'};" in line and " free of " in line
    (trial,) = _study_trials(image_folder, out)
    assert trial.state == TrialState.FAIL and trial.user_attrs["crashed"] and trial.user_attrs["fail_reason"] == line.removeprefix("error: ")
    assert sorted(p.name for p in (out / "trials" / "0").iterdir()) == [STATE_NAME, f"{STATE_NAME}.sha256"]  # evaluation 1's state and its checksum, no partial file
    assert not (out / "best").exists()  # no refit or export on a full disk

    monkeypatch.setattr(torch, "save", save)  # space was freed
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    full, rerun = _study_trials(image_folder, out)
    assert rerun.state == TrialState.COMPLETE and rerun.params == full.params and rerun.user_attrs["resumed_from"] == {"trial": 0, "epoch": 1}
    assert rerun.intermediate_values[1] == full.intermediate_values[1] and (out / "best" / "model.pt").is_file()


# Optuna's SQLite storage, at the DB-API boundary: every write fails as on a full disk once
# the trial's first state is saved (its record of evaluation 1 then fails, and so would the
# failure's record).
STUDY_DATABASE_FILLS_UP = """
import sqlite3
from sqlalchemy import event
from sqlalchemy.engine import Engine
from autoft.training import trainer

full = []

@event.listens_for(Engine, "before_cursor_execute")
def refuse_writes(connection, cursor, statement, *rest):
    if full and statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
        raise sqlite3.OperationalError("database or disk is full")

save = trainer.save_training_state

def save_then_fill(path, state):
    save(path, state)
    full.append(True)

trainer.save_training_state = save_then_fill
"""


def test_a_full_study_database_leaves_the_trial_running_for_the_next_run_to_recover(image_folder, tmp_path):
    out = tmp_path / "full-db"
    args = _one_trial_args(image_folder, out, 2, "--no-refit")
    child = _start_search(args, STUDY_DATABASE_FILLS_UP)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 2, stderr.decode()[-3000:]
    (line,) = _error_lines(stderr.decode())
    assert line.startswith("error: no space left on ") and f"could not write {out};" in line  # the folder of study.db
    (trial,) = _study_trials(image_folder, out)
    assert trial.state == TrialState.RUNNING and not trial.intermediate_values and "fail_reason" not in trial.user_attrs
    assert (out / "trials" / "0" / STATE_NAME).is_file()

    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    stuck, rerun = _study_trials(image_folder, out)
    assert stuck.state == TrialState.FAIL and f"process {child.pid} " in TrialRecord.of(stuck).reason(stuck)
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["resumed_from"] == {"trial": 0, "epoch": 1}  # the state saved before the database filled


def _crash(study: optuna.Study, trial: optuna.Trial, state: bytes | None, folders: Path) -> None:
    """``trial`` dies (as the next run finds it) after saving ``state``; the next attempt is queued."""
    if state is not None:
        (folders / str(trial.number)).mkdir(parents=True)
        (folders / str(trial.number) / STATE_NAME).write_bytes(state)
    trial.set_user_attr("crashed", True)
    study.tell(trial, state=TrialState.FAIL)
    assert recover_trials(study) == [trial.number]


def test_a_retry_resumes_from_the_newest_attempt_that_saved_a_state_and_takes_its_folder_over(tmp_path):
    folders, lock = tmp_path / "trials", tmp_path / CLEANUP_LOCK
    trial_dir = lambda number: folders / str(number)  # noqa: E731
    has_state = lambda number: (trial_dir(number) / STATE_NAME).is_file()  # noqa: E731
    study = optuna.create_study()
    first = study.ask()
    assert retried_from(first, has_state) is None
    _crash(study, first, b"evaluation 2 of attempt 0", folders)
    _crash(study, study.ask(), b"evaluation 3 of attempt 1", folders)
    _crash(study, study.ask(), None, folders)  # killed before its first state
    third = study.ask()
    assert third.number == 3 and study.trials[3].system_attrs["failed_trial"] == 0  # Optuna names only the original
    assert retried_from(third, has_state) == 1 and retried_from(third, lambda number: number == 0) == 0

    taken: list[int | None] = []
    with file_lock(lock):  # a worker deleting trial folders
        thread = threading.Thread(target=lambda: taken.append(take_over_state(third, trial_dir, lock)))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and has_state(1) and not trial_dir(3).exists()  # it waits: no folder is half taken
    thread.join(10)
    assert taken == [1] and (trial_dir(3) / STATE_NAME).read_bytes() == b"evaluation 3 of attempt 1" and not trial_dir(1).exists()


def _attempt(number: int, state: TrialState, original: int | None = None, crashed: bool = False) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        state=state, value=1.0 if state == TrialState.COMPLETE else None,
        system_attrs={} if original is None else {"failed_trial": original}, user_attrs={"crashed": True} if crashed else {},
    )  # fmt: skip
    trial.number = number
    return trial


def test_trial_folders_keep_the_state_a_retry_resumes_from_and_lose_superseded_attempts(tmp_path):
    fail, running, waiting, complete = TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE
    trials = [
        # a retry running, not yet past taking its folder over: it resumes from 1, which superseded 0 (earlier autoft copied states)
        _attempt(0, fail, crashed=True), _attempt(1, fail, 0, crashed=True), _attempt(2, running, 0),
        _attempt(3, fail, crashed=True), _attempt(4, waiting, 3),  # a retry queued
        _attempt(5, fail, crashed=True), _attempt(6, fail, 5, crashed=True),  # a retry killed before its first state: the next resumes from 5
        _attempt(7, fail, crashed=True), _attempt(8, fail, 7, crashed=True), _attempt(9, complete, 7),  # a chain that ran to its end
        _attempt(10, fail, crashed=True),  # crashed; the next run queues it again
        _attempt(11, fail),  # failed on its parameters
        _attempt(12, complete),  # the best
    ]  # fmt: skip
    for number in (0, 1, 3, 5, 7, 8, 9, 10, 11, 12):
        (tmp_path / "trials" / str(number)).mkdir(parents=True)
        (tmp_path / "trials" / str(number) / STATE_NAME).write_bytes(b"state")
    (tmp_path / "trials" / "6").mkdir()
    (tmp_path / "trials" / "6" / f".{STATE_NAME}.x1y2.tmp").write_bytes(b"killed while writing")
    prune_trial_folders(tmp_path, trials, trials[-1], keep_predictions=False)
    assert sorted(int(p.name) for p in (tmp_path / "trials").iterdir()) == [1, 3, 5, 10, 12]


def test_cross_validation_scores_the_mean_of_folds(image_folder, tmp_path):
    result = search("test_resnet", str(image_folder), tmp_path / "cv", trials=2, epochs=1, image_size=16, device="cpu", cv=3, pruner="none", export_onnx=False,
                    batch_size=16, simple_models=False)  # fmt: skip
    for t in _trials(result):  # the default recipe too: every trial is scored on the same folds
        assert t.state == TrialState.COMPLETE
        assert sorted(t.intermediate_values) == [0, 1, 2]
        assert t.value == pytest.approx(np.mean(list(t.intermediate_values.values())))
    # The best recipe is trained again on every labelled image for best/.
    assert load_checkpoint(result.best_dir).meta["params"]["lr"] == result.best_params["lr"]
    metrics = json.loads((result.best_dir / "metrics.json").read_text())
    assert metrics["selection"] == "3-fold cross-validation on 96 images" and metrics["model"]["refit"]["images"] == 96


def test_the_best_trial_is_chosen_among_those_scored_on_every_fold():
    from autoft.searching.finishing import best_trial

    study = optuna.create_study(direction="maximize")
    assert best_trial(study) is None
    every = {str(f): 0.86 for f in range(5)}
    study.add_trial(optuna.trial.create_trial(value=0.86, user_attrs={"fold_scores": every}))
    study.add_trial(optuna.trial.create_trial(value=0.95, user_attrs={"fold_scores": {"0": 0.95}, "cut_short": "the time budget ran out in fold 2 of 5"}))
    study.add_trial(optuna.trial.create_trial(value=0.97, user_attrs={"fold_scores": {"3": 0.97, "1": 0.97}, "pruned_after_folds": 2}))
    assert study.best_trial.number == 2 and best_trial(study).number == 0  # one or two folds are not the evidence five are
    study.add_trial(optuna.trial.create_trial(value=0.90, user_attrs={"fold_scores": {str(f): 0.9 for f in range(5)}}))
    assert best_trial(study).number == 3
    only_cut = optuna.create_study(direction="minimize")  # every trial cut short: the most folds there are
    only_cut.add_trial(optuna.trial.create_trial(value=0.3, user_attrs={"fold_scores": {"0": 0.3}}))
    only_cut.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"fold_scores": {"0": 0.5, "1": 0.5}}))
    only_cut.add_trial(optuna.trial.create_trial(value=0.4, user_attrs={"fold_scores": {"2": 0.4, "1": 0.4}}))
    assert best_trial(only_cut).number == 2  # a loss: the lower of the two-fold trials
    single = optuna.create_study(direction="maximize")  # one split: no fold scores, every trial counts
    for value in (0.7, 0.8):
        single.add_trial(optuna.trial.create_trial(value=value))
    assert best_trial(single).number == 1


def test_small_data_is_cross_validated_unless_told_not_to(image_folder, tmp_path):
    run = dict(trials=2, epochs=1, image_size=16, device="cpu", export_onnx=False, batch_size=16, pruner="none", simple_models=False)
    auto = search("test_resnet", str(image_folder), tmp_path / "auto", **run)
    assert auto.plan["folds"] == 5 and auto.plan["repeats"] == 2  # 96 images: a validation split would hold 19; repeated when under 100
    assert "validation split would hold 19 images" in auto.plan["line"]
    assert sorted(_trials(auto)[1].intermediate_values) == list(range(10))  # after the default recipe's one split
    single = search("test_resnet", str(image_folder), tmp_path / "single", no_cv=True, **run)
    assert single.plan["folds"] is None and len(_trials(single)[0].intermediate_values) == 1


def test_time_budget_keeps_a_cut_trial_and_starts_no_other(image_folder, tmp_path, monkeypatch):
    import types

    import autoft.core.budget
    import autoft.training.trainer

    jumped = [0.0]
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.monotonic = lambda: time.monotonic() + jumped[0]
    monkeypatch.setattr(autoft.core.budget, "time", clock)
    monkeypatch.setattr(autoft.training.trainer, "time", clock)

    def out_of_time_after_first_epoch(event):
        if isinstance(event, TrialEvent) and isinstance(event.event, EpochEnd):
            jumped[0] = 7200.0  # as if the hour of --timeout ran out long ago, its slack for a refit too

    result = search(
        "test_resnet", str(image_folder), tmp_path, trials=2, epochs=3, image_size=16, device="cpu", batch_size=16, export_onnx=False, no_cv=True,
        timeout="1h", on_event=out_of_time_after_first_epoch, simple_models=False,
    )
    (cut,) = [t for t in _trials(result) if t.state != TrialState.WAITING]  # the queued second trial never started: no time was left for it
    assert cut.state == TrialState.COMPLETE and len(cut.intermediate_values) == 1 and "after 1 of 3 evaluations" in cut.user_attrs["cut_short"]
    assert result.best_number == cut.number and (result.best_dir / "model.pt").is_file()
    assert "no time left to refit" in json.loads((result.best_dir / "metrics.json").read_text())["notes"][0]  # its own weights were kept


def test_a_budget_too_short_for_any_trial_is_one_clear_error(image_folder, tmp_path):
    result = CliRunner().invoke(make_app(), ["search", "--backbone", "test_resnet", "--data", str(image_folder), "--out", str(tmp_path), "--timeout", "0.1s", "--device", "cpu"])
    assert result.exit_code == 2 and "--timeout" in result.output


def test_the_command_counts_its_timeout_from_its_own_start(image_folder, tmp_path, monkeypatch):
    """Importing torch and the rest is part of what a user waits for: ``--timeout`` counts it."""
    import autoft.searching

    seen = {}

    def fake_search(*args, started=None, **options):
        seen["started"], seen["called"] = started, time.monotonic()
        raise AutoftError("stop here")

    monkeypatch.setattr(autoft.searching, "search", fake_search)
    before = time.monotonic()
    result = CliRunner().invoke(make_app(), ["search", "--backbone", "test_resnet", "--data", str(image_folder), "--out", str(tmp_path), "--timeout", "1m"])
    assert result.exit_code != 0 and "stop here" in result.output
    assert before <= seen["started"] <= seen["called"]


def test_the_program_counts_its_timeout_from_the_process_start():
    """The ``autoft`` program's clock starts with its process: the interpreter's start and the
    imports before the command ran (here, half a second of sleep) are the user's wait too."""
    code = "import time; time.sleep(0.5); from autoft.core.runtime import process_started; print(time.monotonic() - process_started())"
    waited = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= waited < 30
    from autoft.core.runtime import process_started

    assert process_started() <= time.monotonic() - 0.5  # this test process has run longer than that


def test_the_program_does_not_count_what_a_shell_ran_before_it_execd_autoft():
    """``bash -c "pip install -e . && autoft search ..."`` runs the last command in the shell's own
    process (exec), whose start in /proc is the shell's: the install's time is not the search's
    (the README's quick start, run that way right after its install, was refused)."""
    from autoft.core.runtime import INTERPRETER_START

    code = "import autoft; from autoft.core.runtime import process_started; print(autoft._IMPORTED_AT - process_started())"
    shell = subprocess.run(["bash", "-c", f"sleep 3 && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"], capture_output=True, text=True, check=True)
    assert 0 <= float(shell.stdout) <= INTERPRETER_START  # counted before autoft's import: the interpreter's start at most, not the shell's 3 s of sleep


def test_time_spent_before_the_search_counts_against_its_timeout(image_folder, tmp_path):
    with pytest.raises(AutoftError, match="--timeout"):  # the minute was spent before the search began
        search("test_resnet", str(image_folder), tmp_path, timeout="1m", started=time.monotonic() - 60, device="cpu")


def test_wilcoxon_needs_cv_and_epoch_pruners_refuse_cv(image_folder, tmp_path):
    with pytest.raises(AutoftError, match="--cv"):
        search("test_resnet", str(image_folder), tmp_path, pruner="wilcoxon", no_cv=True, trials=1, epochs=1)
    with pytest.raises(AutoftError, match="wilcoxon or none"):
        search("test_resnet", str(image_folder), tmp_path, cv=3, pruner="hyperband", trials=1, epochs=1)


def test_journal_storage_for_processes_on_one_machine(image_folder, tmp_path):
    from optuna.storages import JournalStorage

    journal = tmp_path / "shared" / "journal.log"
    result = search("test_resnet", str(image_folder), tmp_path / "out", trials=1, epochs=1, image_size=16, device="cpu", storage=str(journal), study="shared", export_onnx=False, no_cv=True)
    assert journal.is_file() and not (tmp_path / "out" / "study.db").exists()
    assert [t.state for t in _trials(result)] == [TrialState.COMPLETE]
    assert isinstance(open_storage(str(tmp_path / "journal.log")), JournalStorage)
    assert isinstance(open_storage(f"journal://{tmp_path / 'j.jsonl'}"), JournalStorage)
    with pytest.raises(AutoftError, match="--storage"):
        open_storage("study.db")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "m5", "5m3"])
def test_bad_durations_are_user_errors(text):
    with pytest.raises(AutoftError, match="--timeout"):
        parse_duration(text)


def test_range_overrides_apply_to_base_and_strategy_parameters(tmp_path):
    file = tmp_path / "space.json"
    file.write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-3, "log": True}, "l2sp_alpha": "0.01:0.1:log", "dropout": 0.2}))
    overrides = load_overrides(["freeze_depth=1:2", "lr=0.0002:0.0003"], file)
    space = SearchSpace(("l2sp",), overrides)
    from autoft_plugins.strategies import L2SP

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = space.suggest(study.ask(), {"l2sp": L2SP()}, n_groups=6)
        assert 2e-4 <= params["lr"] <= 3e-4 and params["dropout"] == 0.2
        assert 1 <= params["freeze_depth"] <= 2 and 0.01 <= params["l2sp_alpha"] <= 0.1
    # The default recipe keeps only values inside the overridden space.
    assert space.defaults("l2sp", L2SP(), 6) == {"weight_decay": 0.01, "label_smoothing": 0.1, "augment": "crop-flip", "strategy": "l2sp", "regularizer": "none", "l2sp_alpha": 0.01}


def test_a_parameter_declared_in_any_branch_of_a_plugins_choices_takes_a_range():
    """Plugins declare parameters define-by-run; one declared only after a choice's second answer
    is still known to --range and to the report, however deep the branch."""

    class Branchy:
        def default_params(self, n_groups):
            return {"mode": "a"}

        def suggest(self, trial, n_groups):
            if trial.suggest_categorical("mode", ["a", "b"]) == "a":
                return {"alpha": trial.suggest_float("alpha", 0.1, 1.0)}
            if trial.suggest_categorical("depth", ["shallow", "deep"]) == "deep":
                return {"gamma": trial.suggest_int("gamma", 1, 8)}
            return {"beta": trial.suggest_float("beta", 1e-3, 1.0, log=True)}

    strategies = {"branchy": Branchy()}
    space = SearchSpace(("branchy",), load_overrides(["beta=0.01:0.1:log", "gamma=2:4"]), regularizers=("none",))
    space.check_names(6, strategies)  # no "no such parameter"
    described = space.describe(6, strategies)
    assert {"alpha", "beta", "gamma", "mode", "depth"} <= set(described)
    assert described["gamma"] == "2 to 4" and described["beta"].startswith("0.01 to 0.1")
    with pytest.raises(AutoftError, match="--range nope"):
        SearchSpace(("branchy",), load_overrides(["nope=1:2"]), regularizers=("none",)).check_names(6, strategies)


def test_a_regulariser_joining_after_the_space_was_described_is_searched():
    """prepare() checks --range names (describing the space) before the unlabelled images are
    ready; FixMatch joins the regularisers only then, and its trials must still build."""
    from autoft_plugins.strategies import Freeze

    space, strategies = SearchSpace(("freeze",)), {"freeze": Freeze()}
    space.check_names(6, strategies)
    space.regularizers = (*space.regularizers, "fixmatch")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"regularizer": "fixmatch"})
    params = space.suggest(study.ask(), strategies, n_groups=6)
    assert params["regularizer"] == "fixmatch" and 0.7 <= params["fixmatch_threshold"] <= 0.98
    assert "fixmatch_weight" in space.describe(6, strategies)


@pytest.mark.parametrize("pair, message", [("lr", "NAME=LOW"), ("lr=a:b", "not a number"), ("lr=0:1:log", "log range"), ("lr=1:0", "above high")])
def test_bad_ranges_are_user_errors(pair, message):
    with pytest.raises(AutoftError, match=message):
        load_overrides([pair])


def test_cli_bad_input_is_one_line(image_folder, tmp_path):
    runner = CliRunner()
    cases = ((["--timeout", "soon"], "--timeout"), (["--strategy", "nope"], "strateg"), (["--range", "lr=1:0"], "above high"), (["--range", "learning_rate=0.1"], "no such parameter"), (["--strategy", "full", "--range", "l2sp_alpha=0.1"], "no such parameter"))
    for extra, message in cases:
        result = runner.invoke(make_app(), ["search", "--backbone", "test_resnet", "--data", str(image_folder), "--out", str(tmp_path), *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_from_pretrained_weights_the_space_also_searches_lr_decay_and_bn():
    import optuna

    from autoft import plugins

    registry = plugins.registry()
    strategies = {name: registry.strategy(name).factory() for name in ("freeze", "l2sp", "lp-ft")}
    pretrained, scratch = SearchSpace(tuple(strategies), pretrained=True), SearchSpace(tuple(strategies))
    described = pretrained.describe(6, strategies)
    assert described["lr_decay"] == "0.5 to 1" and described["bn"] == "adapt, keep"
    assert not {"lr_decay", "bn"} & set(scratch.describe(6, strategies))  # from random weights they mean nothing
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [pretrained.suggest(study.ask(), strategies, 6) for _ in range(12)]
    assert all(0.5 <= d["lr_decay"] <= 1.0 for d in drawn) and {d["bn"] for d in drawn} == {"adapt", "keep"}
    assert not {"lr_decay", "bn"} & set(scratch.suggest(study.ask(), strategies, 6))
    first = pretrained.defaults("lp-ft", strategies["lp-ft"], 6)
    assert (first["lr_decay"], first["bn"], first["head_init"]) == (1.0, "keep", "probe")  # what the default recipe from pretrained weights states
    assert not {"lr_decay", "bn"} & set(scratch.defaults("freeze", strategies["freeze"], 6))
    narrowed = SearchSpace(tuple(strategies), load_overrides(["lr_decay=0.6:0.9", "bn=keep"]), pretrained=True)
    narrowed.check_names(6, strategies)
    assert narrowed.describe(6, strategies)["lr_decay"] == "0.6 to 0.9"
    other = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert all(0.6 <= d["lr_decay"] <= 0.9 and d["bn"] == "keep" for d in (narrowed.suggest(other.ask(), strategies, 6) for _ in range(6)))


def test_lr_decay_and_bn_ranges_from_random_weights_are_one_line_errors(image_folder, tmp_path):
    runner = CliRunner()
    args = ["search", "--backbone", "test_resnet", "--data", str(image_folder), "--out", str(tmp_path), "--weights", "scratch"]
    result = runner.invoke(make_app(), [*args, "--range", "lr_decay=0.6:0.9"])
    assert result.exit_code == 2 and _error_lines(result.output) == ["error: --range lr_decay: searched only from pretrained weights (--weights); this search starts from random ones"]
    assert "lr_decay" in " ".join(runner.invoke(make_app(), ["search", "--help"]).output.split())


def test_study_names_come_from_backbone_and_data():
    assert default_study_name("test_resnet", "sample:digits") == "test_resnet-digits"
    assert default_study_name("resnet50", "/data/flowers/") == "resnet50-flowers"
    assert default_study_name("timm:vit_small", "labels.csv") == "timm-vit_small-labels"


def test_a_slow_report_is_refreshed_less_often_than_every_trial(image_folder, tmp_path, monkeypatch):
    from autoft.searching import runner, trials

    written = []

    def slow_report(session, metrics=None):  # a study whose plots take as long as its trials
        time.sleep(0.5)
        written.append(metrics is not None)

    monkeypatch.setattr(runner, "write_report_quietly", slow_report)
    monkeypatch.setattr(trials, "write_report_quietly", slow_report)
    search("test_resnet", str(image_folder), tmp_path, trials=6, epochs=1, image_size=16, device="cpu", batch_size=16, export_onnx=False, no_cv=True, ensemble=1)
    between = written[:-1]
    assert written[-1] is True  # the whole report at the end, with the final metrics
    assert 1 <= len(between) < 6 and not any(between)  # the first trial's, then no more than 5% of the trials' time
