"""The pretraining stage: methods, checkpoints, cache, unreadable files, the CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from autoft import hookimpl, plugins
from autoft.cli import make_app
from autoft.data import DataSplits
from autoft.training.pretraining import PRETRAINED_FORMAT, checkpoint_epochs, pretrain
from autoft.model.backbones import build_backbone, load_weights
from autoft.specs import PretrainerSpec
from autoft.training.trainer import OutOfTime

from conftest import COLOURS, make_image

BUILTIN_METHODS = ["simclr", "autoencoder", "masked-autoencoder"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AUTOFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pretrain"


@pytest.fixture(scope="module")
def pool(digits) -> torch.Tensor:
    """64 digits at 32px as an unlabelled uint8 tensor."""
    return digits.train.images[:64]


def test_builtin_methods_are_registered():
    assert set(BUILTIN_METHODS) <= set(plugins.registry().pretrainers)


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_short_run_lowers_loss_and_saves_checkpoints(method, pool, tmp_path):
    result = pretrain("test_resnet", pool, tmp_path / method, method=method, epochs=4, batch_size=32, lr=3e-3, device="cpu")
    losses = [e["loss"] for e in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert [c.epoch for c in result.checkpoints] == [1, 2, 4]
    assert [c.fraction for c in result.checkpoints] == [0.25, 0.5, 1.0]
    assert all(c.path.is_file() for c in result.checkpoints)
    written = json.loads((tmp_path / method / "metrics.json").read_text())
    assert [e["loss"] for e in written["epochs"]] == losses
    assert written["checkpoints"][0]["knn_accuracy"] is None  # no labels given


def test_a_pool_on_disk_pretrains_a_batch_at_a_time_exactly_as_in_memory(pool, cache_dir, tmp_path, monkeypatch, whole_reads):
    from autoft.data.decoding import load_data

    monkeypatch.setenv("AUTOFT_MAX_IN_MEMORY", "0")
    on_disk = load_data("sample:digits", image_size=32, seed=0).train.subset(range(64))  # ``pool``, left on disk, with its labels
    assert on_disk.on_disk and torch.equal(on_disk.take(range(64)), pool)
    from_disk = pretrain("test_resnet", on_disk, None, method="autoencoder", epochs=2, batch_size=16, device="cpu")
    assert whole_reads == [] and not from_disk.cached
    assert from_disk.metrics["knn_accuracy_at_start"] is not None  # scored on the set's own labels
    in_memory = pretrain("test_resnet", pool, tmp_path / "in-memory", method="autoencoder", epochs=2, batch_size=16, device="cpu")
    assert [e["loss"] for e in in_memory.history] == [e["loss"] for e in from_disk.history]
    assert pretrain("test_resnet", pool, None, method="autoencoder", epochs=2, batch_size=16, device="cpu").cached  # the same pixels, the same entry


def test_checkpoint_loads_into_a_fresh_backbone_of_the_same_name(pool, tmp_path):
    result = pretrain("test_resnet", pool, tmp_path, method="autoencoder", epochs=1, batch_size=32, device="cpu")
    payload = torch.load(result.final.path, weights_only=True)
    assert payload["format"] == PRETRAINED_FORMAT and payload["backbone"] == "test_resnet"
    saved = payload["state_dict"]

    backbone = build_backbone("test_resnet", num_classes=10, weights=str(result.final.path))
    own = backbone.model.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    # The classifier is not part of a pretrained backbone: it stays fresh, at the task's size.
    assert not set(saved) & set(backbone.head.params)
    assert own["fc.weight"].shape == (10, backbone.num_features)
    fresh = build_backbone("test_resnet", num_classes=10)
    assert sorted(load_weights(fresh.model, result.final.path)) == sorted(backbone.head.params)


def test_vit_trains_through_the_same_methods(tmp_path):
    # timm's test_vit has a fixed 160px input; the decoder and the patch mask follow it.
    images = torch.randint(0, 256, (4, 3, 160, 160), dtype=torch.uint8)
    result = pretrain("test_vit", images, tmp_path, method="masked-autoencoder", epochs=1, batch_size=4, device="cpu")
    assert result.final.path.is_file()
    backbone = build_backbone("test_vit", num_classes=3, weights=str(result.final.path))
    assert torch.equal(backbone.model.state_dict()["cls_token"], torch.load(result.final.path)["state_dict"]["cls_token"])


def test_labelled_split_scores_each_checkpoint(pool, digits, tmp_path):
    labelled = DataSplits(train=digits.train.subset(range(100, 300)), val=digits.val.subset(range(100)), test=None, classes=digits.classes, image_size=32)
    result = pretrain("test_resnet", pool, tmp_path, method="simclr", epochs=2, batch_size=32, labelled=labelled, device="cpu")
    assert result.metrics["knn_accuracy_at_start"] is not None
    for checkpoint in result.checkpoints:
        assert 0.1 < checkpoint.knn_accuracy <= 1.0  # ten classes: far above chance even untrained


def test_stage_is_cached_and_reused(pool, cache_dir):
    first = pretrain("test_resnet", pool, method="autoencoder", epochs=2, batch_size=32, device="cpu")
    assert not first.cached and first.out.parent == cache_dir
    again = pretrain("test_resnet", pool, method="autoencoder", epochs=2, batch_size=32, device="cpu")
    assert again.cached and again.out == first.out
    assert [c.path for c in again.checkpoints] == [c.path for c in first.checkpoints]
    # Another budget or other images are another stage.
    longer = pretrain("test_resnet", pool, method="autoencoder", epochs=3, batch_size=32, device="cpu")
    assert not longer.cached and longer.out != first.out
    assert len(list(cache_dir.iterdir())) == 2


def test_an_interrupted_stage_is_never_taken_as_done(pool, cache_dir):
    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain("test_resnet", pool, method="autoencoder", epochs=2, batch_size=32, device="cpu", on_epoch=interrupt)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())  # no partial folder left either
    result = pretrain("test_resnet", pool, method="autoencoder", epochs=2, batch_size=32, device="cpu")
    assert not result.cached and result.final.epoch == 2


def test_a_killed_stage_leaves_nothing_behind_once_the_next_one_starts(pool, cache_dir):
    import subprocess
    import sys

    from autoft.data.cache import remove_abandoned

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after a kill -9
    cache_dir.mkdir(parents=True, exist_ok=True)
    abandoned = cache_dir / f".abc.{dead.pid}.0000.partial"
    alive = cache_dir / f".abc.{os.getpid()}.0000.partial"
    other = cache_dir / f".xyz.{dead.pid}.0000.partial"
    for folder in (abandoned, alive, other):
        folder.mkdir()
    remove_abandoned(cache_dir, "abc")
    assert not abandoned.exists() and alive.exists() and other.exists()


def test_a_spent_time_budget_still_trains_one_batch_and_leaves_a_checkpoint(pool, tmp_path):
    result = pretrain("test_resnet", pool, tmp_path, method="autoencoder", epochs=8, batch_size=32, time_budget=0.0, device="cpu")
    assert result.metrics["epochs_run"] == 1 and result.metrics["stopped"] == "deadline"
    assert [(c.epoch, c.fraction) for c in result.checkpoints] == [(1, 1.0)]


def test_a_passed_deadline_stops_before_the_first_batch(pool, tmp_path):
    with pytest.raises(OutOfTime, match="before its first batch"):
        pretrain("test_resnet", pool, tmp_path, method="autoencoder", epochs=8, batch_size=32, deadline=time.monotonic() - 1, device="cpu")


def test_checkpoint_epochs():
    assert checkpoint_epochs(20) == [5, 10, 20]
    assert checkpoint_epochs(2) == [1, 2]  # 25% and 50% round to the same epoch
    assert checkpoint_epochs(1) == [1]
    assert checkpoint_epochs(10, (0.3,)) == [3, 10]


def test_cli_class_folder_skips_unreadable_files_and_scores_with_its_labels(class_folder, tmp_path):
    (class_folder / "red" / "broken.png").write_bytes(b"not an image")
    (class_folder / "blue" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    args = ["pretrain", "--backbone", "test_resnet", "--data", str(class_folder), "--out", str(out)]
    args += ["--method", "autoencoder", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--device", "cpu"]
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == 2 and metrics["num_images"] == 8 * len(COLOURS)
    assert {Path(s["source"]).name for s in metrics["skipped"]} == {"broken.png", "empty.jpg"}
    assert [c["epoch"] for c in metrics["checkpoints"]] == [1, 2]
    assert all(c["knn_accuracy"] is not None for c in metrics["checkpoints"])
    assert (out / "backbone-epoch2.pt").is_file()


def test_cli_flat_folder(tmp_path):
    folder = tmp_path / "flat"
    for i in range(6):
        make_image(folder / f"{i}.png", (200, 100, 50), seed=i)
    out = tmp_path / "out"
    args = ["pretrain", "--backbone", "test_resnet", "--data", str(folder), "--out", str(out), "--epochs", "1"]
    result = CliRunner().invoke(make_app(), args + ["--batch-size", "3", "--image-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["skipped_images"] == 0
    assert metrics["checkpoints"][0]["knn_accuracy"] is None  # no labels anywhere


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "simclrr"], "unknown pretraining method 'simclrr' (did you mean simclr?)"),
        (["--backbone", "no_such_model"], "unknown backbone 'no_such_model'"),
    ],
)
def test_cli_bad_names_are_one_line_errors(extra, message, tmp_path):
    make_image(tmp_path / "flat" / "0.png", (1, 2, 3), seed=0)
    args = ["pretrain", "--backbone", "test_resnet", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(make_app(), args + extra)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_folder_without_readable_images_is_an_error(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    args = ["pretrain", "--backbone", "test_resnet", "--data", str(folder), "--out", str(tmp_path / "out"), "--image-size", "32"]
    result = CliRunner().invoke(make_app(), args)
    assert result.exit_code == 2
    assert "no readable images" in result.output


def test_search_with_unlabelled_reuses_the_cached_stage_and_searches_init(class_folder, cache_dir, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    for i in range(10):
        make_image(unlabelled / f"{i}.png", (120, 120, 40), seed=500 + i)
    (unlabelled / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    base = ["search", "--backbone", "test_resnet", "--data", str(class_folder), "--unlabelled", str(unlabelled)]
    base += ["--pretrain", "autoencoder", "--pretrain-epochs", "2", "--trials", "2", "--epochs", "1", "--batch-size", "8"]
    base += ["--image-size", "32", "--no-onnx", "--device", "cpu"]
    runs = []
    for name in ("first", "second"):
        result = CliRunner().invoke(make_app(), base + ["--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs.append(json.loads((tmp_path / name / "pretrain.json").read_text()))
    assert [r["cached"] for r in runs] == [False, True]
    assert runs[0]["cache"] == runs[1]["cache"] and len(list(cache_dir.iterdir())) == 1
    assert runs[0]["skipped_images"] == 1
    # The pool is the unlabelled images plus every labelled image (labels never enter the loss).
    assert runs[0]["num_images"] == 10 + 24
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'second' / 'study.db'}")
    choices = study.trials[0].distributions["init"].choices
    assert choices[-1] == "scratch" and len(choices) == 3  # epochs 1 and 2, then scratch
    assert all(t.params["init"] in choices for t in study.trials)
    assert all(Path(c).is_file() for c in choices[:-1])


def test_search_timeout_gives_pretraining_its_planned_share(class_folder, cache_dir, tmp_path):
    from autoft.searching import search

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    result = search(
        "test_resnet", str(class_folder), tmp_path / "out", trials=1, epochs=1, timeout=60, batch_size=8, image_size=32,
        device="cpu", export_onnx=False, unlabelled=images, pretrain="autoencoder", simple_models=False,
    )  # fmt: skip
    stage = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    plan = result.plan
    assert plan["pretrain_epochs"] >= 1 and stage["planned_epochs"] <= plan["pretrain_epochs"]
    # Planned from the measured throughput; the stage stops at its share, give or take one epoch.
    assert stage["seconds"] < 1.1 * plan["pretrain_seconds"] + 2 * max(e["seconds"] for e in stage["epochs"]) + 1
    assert result.seconds < 60 * 1.05 + 30
    assert "init" in result.best_params


class SlowAutoencoder:
    """The built-in autoencoder with a slow step: an epoch far longer than the deadline."""

    @hookimpl
    def autoft_register_pretrainers(self, register):
        from autoft_plugins.pretrainers import Autoencoder

        class Slow(Autoencoder):
            def loss(self, backbone, images):
                time.sleep(0.1)
                return super().loss(backbone, images)

        register(PretrainerSpec("slow-autoencoder", "", Slow))


@pytest.fixture
def slow_method():
    pm = plugins.get_plugin_manager()
    pm.register(SlowAutoencoder(), name="slow")
    plugins.set_default_plugin_manager(pm)
    try:
        yield "slow-autoencoder"
    finally:
        plugins.set_default_plugin_manager(None)


def test_a_deadline_inside_a_long_pretraining_epoch_stops_after_that_batch_and_keeps_a_checkpoint(pool, slow_method, tmp_path):
    batches = []
    started = time.monotonic()
    result = pretrain(
        "test_resnet", pool, tmp_path, method=slow_method, epochs=3, batch_size=2, device="cpu",  # 32 batches of 0.1 s an epoch
        deadline=started + 1.0, on_batch=lambda step, steps: batches.append(step),
    )  # fmt: skip
    assert time.monotonic() - started < 1.0 + 2.0  # one batch past the deadline, then a checkpoint; not 3 s of epoch
    assert 1 <= len(batches) < 32 and result.metrics["stopped"] == "deadline"
    assert result.metrics["epochs_run"] == 1 and result.metrics["epochs"][0]["stopped"] == "deadline"
    assert [c.epoch for c in result.checkpoints] == [1] and result.final.path.is_file()
    build_backbone("test_resnet", num_classes=3, weights=str(result.final.path))  # a usable checkpoint


def test_ctrl_c_in_a_cached_stage_caches_nothing(pool, slow_method, cache_dir):
    from autoft.core import runtime

    def interrupt(step, steps):
        runtime.request_stop()

    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain("test_resnet", pool, method=slow_method, epochs=2, batch_size=32, device="cpu", on_batch=interrupt)
    finally:
        runtime.clear_stop()
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_on_pretrained_weights_only_checkpoints_whose_knn_beats_the_start_are_offered(tmp_path):
    from autoft.searching.pretraining_stage import helpful
    from autoft.training.pretrain_pool import PretrainCheckpoint

    checkpoints = [PretrainCheckpoint(1, 0.25, tmp_path / "a.pt", 0.70), PretrainCheckpoint(2, 0.5, tmp_path / "b.pt", 0.81), PretrainCheckpoint(4, 1.0, tmp_path / "c.pt", None)]
    kept, note = helpful(checkpoints, 0.80, pretrained=True)
    assert kept == [checkpoints[1]]
    assert note == "pretraining checkpoints left out, their k-NN accuracy no better than the starting weights' 0.800: epoch 1 (0.700), epoch 4 (unmeasured)"
    assert helpful(checkpoints, 0.80, pretrained=False) == (checkpoints, None)  # from random weights the trials measure every one
    assert helpful(checkpoints, None, pretrained=True) == (checkpoints, None)  # nothing to compare with: nothing left out
    assert helpful(checkpoints, 0.95, pretrained=True) == ([], note.replace("0.800", "0.950").replace("epoch 1 (0.700), epoch 4", "epoch 1 (0.700), epoch 2 (0.810), epoch 4"))
