"""Small data: pseudo-labels from --unlabelled, the refit on every image, ensembles that export and serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from autoft.model.checkpoints import load_checkpoint, save_checkpoint, save_ensemble
from autoft.searching import search
from conftest import COLOURS, make_image


@pytest.fixture(scope="module")
def labelled_and_unlabelled(tmp_path_factory) -> tuple[Path, Path]:
    """6 labelled images a colour, and 30 unlabelled ones of the same colours."""
    root = tmp_path_factory.mktemp("semi")
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            make_image(root / "labelled" / name / f"{i}.png", colour, seed=10 * c + i, size=16)
        for i in range(10):
            make_image(root / "unlabelled" / f"{name}{i}.png", colour, seed=1000 + 10 * c + i, size=16)
    return root / "labelled", root / "unlabelled"


@pytest.fixture(scope="module")
def semi_search(labelled_and_unlabelled, tmp_path_factory):
    labelled, unlabelled = labelled_and_unlabelled
    sessions = []
    result = search(
        "test_resnet", str(labelled), tmp_path_factory.mktemp("run"), unlabelled=str(unlabelled), trials=3, epochs=2, pretrain_epochs=1,
        pretrain="autoencoder", image_size=16, device="cpu", export_onnx=False, ensemble=1, pre_search=[sessions.append], simple_models=False,
    )  # fmt: skip
    return result, sessions[0]


def test_pseudo_labels_train_only_the_most_confident_unlabelled_images(semi_search):
    _, session = semi_search
    train_index = session.ctx.splits[0][0]
    plain = session.fit_data(0, {"pseudo_labels": "none"})
    half = session.fit_data(0, {"pseudo_labels": "propagate", "pseudo_fraction": 0.5})
    assert len(plain.train) == len(train_index)
    assert len(half.train) == len(train_index) + 15  # half of the 30 unlabelled images
    pseudo = session.pseudo(0, train_index)
    added = half.train.images[len(train_index) :]
    kept = np.argsort(-pseudo.confidence, kind="stable")[:15]
    assert torch.equal(added, session.ctx.unlabelled[torch.as_tensor(np.sort(pseudo.index[kept]))])
    assert pseudo.confidence[kept].min() >= np.delete(pseudo.confidence, kept).max()
    assert (half.train.labels[len(train_index) :].numpy() == pseudo.labels[np.sort(kept)]).all()


def test_pseudo_labels_never_see_the_validation_labels(semi_search):
    _, session = semi_search
    train_index, val_index = session.ctx.splits[0]
    original = session.ctx.pool.labels.clone()
    session.ctx.pool.labels[torch.as_tensor(val_index)] = (original[torch.as_tensor(val_index)] + 1) % 3  # scramble what must not matter
    try:
        session.state.pseudo.pop(0, None)
        scrambled = session.pseudo(0, train_index)
    finally:
        session.ctx.pool.labels.copy_(original)
        session.state.pseudo.pop(0, None)
    assert (scrambled.labels == session.pseudo(0, train_index).labels).all()


def test_the_search_plans_pretraining_and_chooses_pseudo_labels(semi_search):
    result, _ = semi_search
    assert result.plan["folds"] and result.plan["pretrain_epochs"] == 1
    assert result.best_params["pseudo_labels"] in ("propagate", "none") and "init" in result.best_params
    metrics = json.loads((result.best_dir / "metrics.json").read_text())
    assert metrics["num_unlabelled"] == 30
    refit = metrics["model"]["refit"]
    pseudo = result.best_params["pseudo_labels"] == "propagate"
    assert refit["labelled"] == 18 and refit["images"] == 18 + (round(result.best_params["pseudo_fraction"] * 30) if pseudo else 0)
    assert "logistic regression on pixels" in result.report.read_text()  # the baselines are in the report


def test_a_search_over_a_pool_on_disk_never_reads_it_whole(labelled_and_unlabelled, tmp_path, monkeypatch, whole_reads):
    """Pretraining, the baselines, pseudo-labels, trials, the refit and the report all read a pool on disk a batch at a time."""
    from autoft.training.trainer import Trainer, TrainerConfig
    from autoft.model.backbones import build_backbone

    labelled, unlabelled = labelled_and_unlabelled
    monkeypatch.setenv("AUTOFT_MAX_IN_MEMORY", "0")
    sessions = []
    result = search(
        "test_resnet", str(labelled), tmp_path / "run", unlabelled=str(unlabelled), trials=2, epochs=1, pretrain_epochs=1,
        pretrain="autoencoder", image_size=16, device="cpu", export_onnx=False, ensemble=1, pre_search=[sessions.append], simple_models=False,
    )  # fmt: skip
    session = sessions[0]
    assert session.ctx.pool.on_disk and result.report.is_file() and session.ctx.baselines
    data = session.fit_data(0, {"pseudo_labels": "propagate", "pseudo_fraction": 0.5})  # on disk, joined with pseudo-labelled images in memory
    assert data.train.on_disk and len(data.train) == len(session.ctx.splits[0][0]) + 15
    Trainer(build_backbone("test_resnet", num_classes=3), data, {"strategy": "full"}, TrainerConfig(epochs=1, batch_size=8, device="cpu"), registry=session.ctx.registry).fit()
    assert whole_reads == []  # (before: the pool and the pseudo-labels' training split, every report, the pretraining pool)


@pytest.fixture(scope="module")
def two_models(digits_run, tmp_path_factory):
    """Two checkpoints of one backbone: the trained digits run and a perturbed copy of it."""
    folder = tmp_path_factory.mktemp("members")
    first = load_checkpoint(digits_run)
    second = load_checkpoint(digits_run)
    with torch.no_grad():
        for p in second.backbone.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    paths = []
    for i, loaded in enumerate((first, second)):
        meta = loaded.meta
        paths.append(save_checkpoint(folder / f"{i}.pt", backbone_name=meta["backbone"], backbone=loaded.backbone, classes=meta["classes"],
                                     image_size=meta["image_size"], params=meta["params"], data=meta["data"], seed=meta["seed"]))  # fmt: skip
    return paths


def test_an_ensemble_exports_as_one_verified_graph_and_predicts_unchanged(two_models, tmp_path):
    from autoft.deploy.exporting import export
    from autoft.deploy.inference import OnnxClassifier

    checkpoint = save_ensemble(tmp_path / "model.pt", two_models, [0.75, 0.25])
    ensemble = load_checkpoint(checkpoint)
    assert len(ensemble.members) == 2 and ensemble.meta["ensemble"][0]["weight"] == 0.75
    result = export(ensemble, tmp_path)
    checks = result.report["checks"]["fp32"]
    assert len(checks) == 2 and all(c["top1_agreement"] == 1.0 and c["max_abs_diff"] < 1e-3 for c in checks.values())  # batch 1 and 32

    pixels = torch.rand(5, 3, ensemble.meta["image_size"], ensemble.meta["image_size"])
    with torch.inference_mode():
        members = [load_checkpoint(p).network()(pixels).softmax(1) for p in two_models]
    expected = (0.75 * members[0] + 0.25 * members[1]).numpy()
    classifier = OnnxClassifier.load(tmp_path)  # what predict and serve load
    assert np.allclose(classifier.probabilities(pixels.numpy()), expected, atol=1e-4)


def _digit_folder(root: Path, per_class: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(root / str(label) / f"{i}.png")
    return root


def labelled_colours(root: Path) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(12):
            make_image(root / name / f"{i}.png", colour, seed=10 * c + i, size=16)
    return root


def test_mirror_images_tell_whether_flips_keep_labels(tmp_path):
    from autoft.training.baselines import flips_change_labels, mirror_accuracies
    from autoft import plugins
    from autoft.data import ImageTensors
    from autoft.data.decoding import decode_and_split

    registry = plugins.registry()
    for folder, symmetric in ((_digit_folder(tmp_path / "digits", 30), False), (labelled_colours(tmp_path / "colours"), True)):
        spec, argument = registry.dataset(str(folder))
        data = decode_and_split(spec.factory(argument), image_size=16, val_fraction=0.3, seed=0)
        pool = torch.cat([data.train.images, data.val.images])
        labels = np.concatenate([data.train.labels.numpy(), data.val.labels.numpy()])
        split = (np.arange(len(data.train)), np.arange(len(data.train), len(labels)))
        plain, mirrored = mirror_accuracies(ImageTensors(pool, torch.as_tensor(labels)), split)
        chance = np.bincount(labels).max() / len(labels)
        assert flips_change_labels(plain, mirrored, chance) is not symmetric, (folder.name, plain, mirrored)


def test_a_search_on_digits_trains_without_flips(tmp_path):
    folder = _digit_folder(tmp_path / "digits", 12)
    result = search("test_resnet", str(folder), tmp_path / "run", trials=1, epochs=1, image_size=16, device="cpu", batch_size=16, export_onnx=False, no_cv=True, ensemble=1)
    plan = json.loads((result.best_dir / "metrics.json").read_text())["plan"]
    assert plan["flips"] is False and "no flips" in plan["line"]
    stored = optuna.load_study(study_name=result.study_name, storage=result.storage).user_attrs["plan"]
    assert stored["flips"] is False and "no flips" in stored["line"]  # what the dashboard shows agrees


def test_the_refit_learns_from_the_best_trials_models_only_when_they_label_better(semi_search):
    from types import SimpleNamespace

    from autoft.searching.finishing import self_training
    from autoft.searching.objective import TEACHER_NAME, save_array
    from autoft.training.semisupervised import PseudoLabels

    result, session = semi_search
    best = SimpleNamespace(number=result.best_number, params={**result.best_params, "pseudo_labels": "propagate", "pseudo_fraction": 1.0})
    everything = np.arange(len(session.ctx.pool))
    propagated = session.pseudo(None, everything)
    wrong = (propagated.labels + 1) % 3  # what the trial's models say: unlike propagation, to tell them apart
    path = session.ctx.trial_dir(best.number) / TEACHER_NAME
    saved = path.read_bytes() if path.is_file() else None
    save_array(session.ctx.trial_dir(best.number) / TEACHER_NAME, np.eye(3)[wrong] * 0.9 + 0.1 / 3)
    try:
        session.teach_refit(PseudoLabels(propagated.index, propagated.labels, propagated.confidence, score=1.01))  # propagation labels better
        assert self_training(session, best) is None
        assert (session.fit_data(None, best.params).train.labels[len(everything) :].numpy() == propagated.most_confident(1.0)[1]).all()

        session.teach_refit(PseudoLabels(propagated.index, propagated.labels, propagated.confidence, score=0.0))  # the models label better
        note = self_training(session, best)
        assert note and f"trial {best.number}'s models" in note
        refit = session.fit_data(None, {**best.params, "pseudo_fraction": 0.1})
        assert len(refit.train) == len(everything) + 30  # the models gave each label 0.93: all kept, whatever the recipe's share
        assert (refit.train.labels[len(everything) :].numpy() == wrong).all()  # every unlabelled image, with the models' labels
    finally:
        path.unlink()
        if saved is not None:
            path.write_bytes(saved)
        session.state.pseudo.pop(-1, None)


def test_a_trial_on_pseudo_labels_keeps_its_models_probabilities_for_the_unlabelled_images(semi_search):
    from autoft.searching.objective import load_teacher

    result, session = semi_search
    folder = session.ctx.trial_dir(result.best_number)
    teacher = load_teacher(folder)
    if result.best_params.get("pseudo_labels") == "propagate":
        assert teacher is not None and teacher.shape == (30, 3) and np.allclose(teacher.sum(1), 1, atol=1e-4)
    else:
        assert teacher is None  # nothing to teach a refit that uses no pseudo-labels
