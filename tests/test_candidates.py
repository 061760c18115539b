"""Simple models as candidates: scored like trials, and shipped like them (checkpoint, verified
ONNX export, ``autoft predict``, ``autoft serve``) with the predictions scikit-learn gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from autoft.training.baselines import pixel_baseline
from autoft.model.candidate_modules import average_pool_matrix
from autoft.training.candidates import PIXELS_NAME, SPREAD_NAME, Probe, fit_candidates, held_out
from autoft.model.checkpoints import load_checkpoint
from autoft.cli import make_app
from autoft.data import ImageTensors
from autoft.errors import AutoftError
from autoft.deploy.inference import OnnxClassifier
from autoft.searching.session import make_splits
from autoft.training.semisupervised import PseudoLabels, downscaled_pixels, pseudo_label
from autoft.deploy.serving import ServeConfig, create_app

PROBE_NAME = "linear probe on random test_resnet features"
SPREAD_PROBE_NAME = "linear probe on random test_resnet features and spread labels"
POOL = 150  # labelled digits the candidates are fitted on
UNLABELLED = 200
TOLERANCE = 1e-4  # largest |module - scikit-learn| allowed in a probability


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


def raw_pixels(images) -> np.ndarray:
    pixels = downscaled_pixels(images)
    return pixels.reshape(len(pixels), -1)


@pytest.fixture(scope="module")
def pool(digits):
    return digits.train.subset(np.arange(POOL))


@pytest.fixture(scope="module")
def splits(pool):
    return make_splits(pool.labels.numpy(), POOL, folds=3, repeats=1, seed=0)


@pytest.fixture(scope="module")
def probe():
    return Probe.build("test_resnet", None, 10, seed=0)


@pytest.fixture(scope="module")
def candidates(digits, pool, splits, probe):
    unlabelled = digits.train.images[POOL : POOL + UNLABELLED]

    def pseudo(split, train):  # as a search passes its own: labels spread in the pixels' space (the quickest)
        return pseudo_label(pool.subset(train), pool.labels.numpy()[train], unlabelled, 10, seed=0)

    found = fit_candidates(pool, splits, digits.classes, accuracy, probe=probe, unlabelled=unlabelled, pseudo=pseudo, spread_probe=True, seed=0)
    return {c.name: c for c in found}


@pytest.fixture(scope="module")
def fitted(candidates):
    """Each candidate's scikit-learn model fitted on every labelled image, as a function of images."""
    found = {}
    for name, candidate in candidates.items():
        fitter = candidate.fitter
        if name in (PIXELS_NAME, SPREAD_NAME):
            found[name] = (fitter.fit_model(), raw_pixels)
        else:
            found[name] = (fitter.fit_model(), fitter.probe.embed)
    return found


def sklearn_probabilities(fitted, name: str, images, classes: int = 10) -> np.ndarray:
    """What the candidate's scikit-learn model, fitted on every labelled image, gives ``images``."""
    model, features = fitted[name]
    expected = np.zeros((len(images), classes))
    expected[:, model.classes_] = model.predict_proba(features(images))
    return expected


@pytest.fixture(scope="module")
def shipped(candidates, tmp_path_factory):
    """Each candidate refitted on every labelled digit: {name: checkpoint path}."""
    root = tmp_path_factory.mktemp("candidates")
    return {name: c.refit(root / str(i) / "model.pt", data="sample:digits", seed=0) for i, (name, c) in enumerate(candidates.items())}


@pytest.mark.parametrize("size", [12, 16, 20, 24, 32, 50])
def test_pixel_downscaling_is_the_baselines_adaptive_pooling(size):
    x = torch.rand(2, 3, size, size)
    matrix = average_pool_matrix(size, 16)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, 16) if size > 16 else x
    torch.testing.assert_close(matrix @ x @ matrix.t(), expected)


def test_candidates_are_scored_on_the_trials_splits(candidates, pool, splits):
    assert list(candidates) == [PIXELS_NAME, PROBE_NAME, SPREAD_PROBE_NAME, SPREAD_NAME]
    labels = pool.labels.numpy()
    reference = pixel_baseline(pool, labels, splits, 10, accuracy)
    pixels = candidates[PIXELS_NAME]
    assert pixels.reference.value == reference.value  # the baseline's figure, unchanged
    for candidate in candidates.values():
        # Like a cross-validated trial's predictions.npy: every pool image, predicted by the
        # fold that held it out; the value is the mean of the folds' scores.
        np.testing.assert_array_equal(candidate.index, np.arange(POOL))
        np.testing.assert_allclose(candidate.probabilities.sum(1), 1.0, atol=1e-5)
        assert len(candidate.split_scores) == len(splits) == 3
        assert candidate.value == pytest.approx(np.mean(candidate.split_scores))
        assert candidate.value > 0.5, f"{candidate.name} learned nothing: {candidate.value}"
    order = np.concatenate([val for _, val in splits])
    np.testing.assert_allclose(pixels.probabilities[order], reference.probabilities, atol=1e-6)
    held = pixel_baseline(pool, labels, splits[:1], 10, accuracy)
    assert held.value == pytest.approx(pixels.split_scores[0])


def test_the_probe_on_spread_labels_learns_from_each_splits_spread_labels(digits, pool, splits, probe):
    """Given wrong spread labels (each the next digit), the probe on spread labels scores far below
    itself given the unlabelled digits' true labels, and below the probe on the labelled images
    alone: the spread labels are in its fit.
    Each split's labels are asked for with that split's training images only (no validation
    label leaks), and every labelled image's for the model that ships."""
    unlabelled = digits.train.subset(np.arange(POOL, POOL + 600))
    truth = unlabelled.labels.numpy()
    asked = []

    def told(labels):
        def pseudo(split, train):
            asked.append((split, tuple(train)))
            return PseudoLabels(np.arange(len(labels)), labels, np.ones(len(labels)))

        return pseudo

    def spread_probe(labels):
        found = fit_candidates(pool, splits, digits.classes, accuracy, probe=probe, unlabelled=unlabelled.images, pseudo=told(labels), spread_probe=True)
        return {c.name: c for c in found}

    right = spread_probe(truth)
    wrong = spread_probe((truth + 1) % 10)[SPREAD_PROBE_NAME]
    assert wrong.value < right[SPREAD_PROBE_NAME].value - 0.2 and wrong.value < right[PROBE_NAME].value - 0.2
    assert [(split, train) for split, train in asked[: len(splits)]] == [(i, tuple(train)) for i, (train, _) in enumerate(splits)]
    asked.clear()
    right[SPREAD_PROBE_NAME].fitter.fit_model()
    assert asked == [(None, tuple(range(POOL)))]


def test_a_probe_keeps_the_features_of_the_image_sets_it_was_last_asked_for(probe, digits):
    images = digits.train.images[:40]
    first = probe.embed(images)
    assert probe.embed(images) is first  # kept: the unlabelled pool is embedded once a search
    again = probe.embed(images.clone())  # the same pixels, another set: computed, not mistaken for it
    assert again is not first and np.allclose(again, first, atol=1e-5)
    for n in range(1, 6):
        probe.embed(digits.train.images[: 40 + n])
    assert probe.embed(images) is not first  # the least recently asked for is let go


def test_repeated_folds_give_each_image_the_mean_of_its_predictions():
    splits = [(np.array([2, 3]), np.array([0, 1])), (np.array([0, 1]), np.array([2, 3])), (np.array([1, 3]), np.array([2, 0]))]
    rows = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    index, probabilities = held_out(splits, rows, pool_size=5)
    np.testing.assert_array_equal(index, [0, 1, 2, 3])  # image 4 was never held out
    np.testing.assert_allclose(probabilities, [[0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.2, 0.8]])


def test_a_single_split_gives_its_validation_images(digits, pool):
    split = [(np.arange(100), np.arange(100, POOL))]
    (pixels,) = fit_candidates(pool, split, digits.classes, accuracy)
    np.testing.assert_array_equal(pixels.index, np.arange(100, POOL))
    np.testing.assert_allclose(pixels.probabilities, pixels.reference.probabilities, atol=1e-6)
    assert pixels.value == pixels.reference.value


def test_each_candidate_module_gives_scikit_learns_probabilities(candidates, fitted, shipped, digits):
    """load_checkpoint rebuilds each module; the probe's backbone is built afresh (another
    random initialisation), so its match proves the checkpoint carries the body's weights."""
    val = digits.val.subset(np.arange(64))
    for name in candidates:
        loaded = load_checkpoint(shipped[name])
        with torch.inference_mode():
            got = loaded.network()(val.images.float().div(255)).softmax(1).numpy()
        difference = np.abs(got - sklearn_probabilities(fitted, name, val)).max()
        assert difference < TOLERANCE, f"{name}: the module differs from scikit-learn by {difference:.2e}"
        assert loaded.classes == digits.classes and loaded.meta["candidate"]["kind"] in ("pixels", "probe", "neighbours")


def test_two_classes_and_a_class_never_seen(digits, tmp_path):
    """Binary logistic regression has one decision function, folded into two logits; a
    class with no labelled image gets probability 0, as scikit-learn gives it."""
    keep = np.flatnonzero(digits.train.labels.numpy() < 2)[:60]
    pool = digits.train.subset(keep)
    split = [(np.arange(40), np.arange(40, 60))]
    (pixels,) = fit_candidates(pool, split, ["0", "1", "never"], accuracy)
    loaded = load_checkpoint(pixels.refit(tmp_path / "model.pt"))
    val = digits.val.subset(np.flatnonzero(digits.val.labels.numpy() < 3)[:30])
    with torch.inference_mode():
        got = loaded.network()(val.images.float().div(255)).softmax(1).numpy()
    expected = sklearn_probabilities({"binary": (pixels.fitter.fit_model(), raw_pixels)}, "binary", val, classes=3)
    assert np.abs(got - expected).max() < TOLERANCE
    assert got[:, 2].max() < 1e-6 and pixels.probabilities[:, 2].max() == 0


def test_candidate_checkpoints_export_with_their_verification_and_match(fitted, shipped, digits):
    """`autoft export` on each candidate's checkpoint: the export checks onnxruntime against
    PyTorch on the recorded data's validation images, and its outputs are scikit-learn's."""
    val = digits.val.subset(np.arange(64))
    for name, checkpoint in shipped.items():
        result = CliRunner().invoke(make_app(), ["export", str(checkpoint.parent)])
        assert result.exit_code == 0, f"{name}: {result.output}"
        report = json.loads((checkpoint.parent / "export.json").read_text())
        assert report["checks"]["fp32"]["batch_32"]["top1_agreement"] == 1.0
        classifier = OnnxClassifier.load(checkpoint.parent, device="cpu")
        difference = np.abs(classifier.probabilities(val.images.float().div(255).numpy()) - sklearn_probabilities(fitted, name, val)).max()
        assert difference < TOLERANCE, f"{name}: the ONNX model differs from scikit-learn by {difference:.2e}"


def test_label_spreadings_neighbours_export_verified_on_their_own_references(shipped, pool, tmp_path):
    """A search verifies its export on labelled images, and every labelled image is one of the
    k-NN model's references: its own nearest neighbour, at a distance of zero up to rounding,
    which float32 rounds differently in PyTorch and onnxruntime. The votes must not depend on
    that (inverse-distance weights did: a class absent in one runtime and not the other)."""
    from autoft.deploy.exporting import export

    loaded = load_checkpoint(shipped[SPREAD_NAME])
    result = export(loaded, tmp_path, images=pool)
    assert all(check["top1_agreement"] == 1.0 for check in result.report["checks"]["fp32"].values())


def test_label_spreadings_neighbours_are_ranked_in_float64_in_pytorch_and_onnxruntime(tmp_path):
    """Twenty references 1e-9 to 2e-8 (squared) from an image: float32 cannot rank them (its
    rounding of the squared distances is near 1e-6 here) and PyTorch and onnxruntime would rank
    them apart, as they did for one verification image on gray scenes. Ranked exactly, the 10
    nearest hold 7 votes for class 0 and 3 for class 1."""
    from autoft.deploy.exporting import export_verified
    from autoft.deploy.inference import create_session
    from autoft.model.candidate_modules import neighbours_backbone

    side, width = 4, 48
    backbone = neighbours_backbone(side, side, 2, references=20, components=width, neighbours=10, normalise=False)
    image = torch.arange(width, dtype=torch.float32).div(width).reshape(1, 3, side, side)  # exact in float32
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(20, width))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    references = image.double().flatten(1).numpy() + directions * np.sqrt((np.arange(20) + 1) * 1e-9)[:, None]
    labels = np.array([0, 0, 1, 0, 0, 1, 0, 0, 1, 0] + [1] * 10)
    with torch.no_grad():
        backbone.model.components.copy_(torch.eye(width, dtype=torch.float64))
        backbone.model.references.copy_(torch.from_numpy(references))
        backbone.model.votes.copy_(torch.from_numpy(np.eye(2)[labels]))
    model = backbone.model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(image).softmax(1), torch.tensor([[0.7, 0.3]]))
    images = ImageTensors(image.mul(width).round().to(torch.uint8).repeat(4, 1, 1, 1), torch.zeros(4, dtype=torch.long))
    path, _ = export_verified(model, images, side, tmp_path, None)
    session = create_session(path)
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    np.testing.assert_allclose(torch.from_numpy(got).softmax(1).numpy(), [[0.7, 0.3]], atol=1e-6)

    # Duplicate references at the 10th and 11th place with other labels: the earlier one counts, in both runtimes.
    with torch.no_grad():
        backbone.model.references[10] = backbone.model.references[9]
        backbone.model.votes[9], backbone.model.votes[10] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    (tmp_path / "ties").mkdir()
    path, _ = export_verified(model, images, side, tmp_path / "ties", None)
    session = create_session(path)
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    with torch.inference_mode():
        torch.testing.assert_close(model(image).softmax(1), torch.tensor([[0.7, 0.3]]))
    np.testing.assert_allclose(torch.from_numpy(got).softmax(1).numpy(), [[0.7, 0.3]], atol=1e-6)


def test_a_shipped_candidate_is_served_and_predicted(fitted, shipped, digits, live_app, tmp_path):
    """The distilled label-spreading model, exported above, answers over real HTTP and from `autoft predict`."""
    folder = shipped[SPREAD_NAME].parent
    if not (folder / "model.onnx").is_file():
        from autoft.deploy.exporting import export

        export(folder)
    classifier = OnnxClassifier.load(folder, device="cpu")
    images = digits.val.subset(np.arange(4))
    expected = sklearn_probabilities(fitted, SPREAD_NAME, images)
    pngs = []
    for i in range(len(images)):
        buffer = io.BytesIO()
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())

    address = live_app(create_app(classifier, ServeConfig(max_batch=4, max_delay_ms=5)))
    with httpx.Client(base_url=f"http://{address}", timeout=30) as http:
        for png, row in zip(pngs, expected):
            reply = http.post("/predict?top_k=1", files={"file": ("digit.png", png, "image/png")})
            assert reply.status_code == 200, reply.text
            (top,) = reply.json()["predictions"]
            assert top["label"] == digits.classes[int(row.argmax())]
            assert top["probability"] == pytest.approx(row.max(), abs=TOLERANCE)

    result = CliRunner().invoke(make_app(), ["predict", str(folder), str(tmp_path), "--top-k", "1", "--format", "json"])
    assert result.exit_code == 0, result.output
    answers = {Path(p["path"]).name: p for p in json.loads(result.output)}
    for i, row in enumerate(expected):
        (top,) = answers[f"{i}.png"]["predictions"]
        assert top["label"] == digits.classes[int(row.argmax())] and top["probability"] == pytest.approx(row.max(), abs=TOLERANCE)


def test_an_unknown_kind_of_simple_model_is_one_line(tmp_path, digits, pool):
    (pixels,) = fit_candidates(pool, [(np.arange(100), np.arange(100, POOL))], digits.classes, accuracy)
    path = pixels.refit(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["candidate"] = {"kind": "gradient boosting"}
    torch.save(payload, path)
    with pytest.raises(AutoftError, match="unknown kind of simple model 'gradient boosting'"):
        load_checkpoint(path)


def test_an_ensemble_of_a_network_and_simple_models_exports_as_one_verified_graph(candidates, fitted, shipped, digits, tmp_path):
    """Members normalise the pixels their own way (the network by ImageNet's statistics, the
    pixel models not at all): the exported ensemble gives the weighted mean of what each
    member gives alone, and the export's own verification passes."""
    from autoft.deploy.exporting import export
    from autoft.model.backbones import build_backbone
    from autoft.model.checkpoints import save_checkpoint, save_ensemble

    torch.manual_seed(0)
    network = build_backbone("test_resnet", num_classes=10)
    image_size = int(digits.train.image_shape[-1])
    trial = save_checkpoint(tmp_path / "trial.pt", backbone_name="test_resnet", backbone=network, classes=digits.classes, image_size=image_size,
                            params={"dropout": 0.0}, data="sample:digits", seed=0)  # fmt: skip
    members = [trial, shipped[PIXELS_NAME], shipped[SPREAD_NAME]]
    loaded = load_checkpoint(save_ensemble(tmp_path / "best" / "model.pt", members, [0.5, 0.3, 0.2]))
    assert [m.get("candidate") for m in loaded.meta["ensemble"]][0] is None and loaded.meta["ensemble"][1]["candidate"]["kind"]
    assert loaded.norms[0] != loaded.norms[1]  # the network's ImageNet statistics, the pixel model's none
    val = digits.val.subset(np.arange(16))
    pixels = val.images.float().div(255)
    with torch.inference_mode():
        alone = load_checkpoint(trial).network()(pixels).softmax(1).numpy()
    expected = 0.5 * alone + 0.3 * sklearn_probabilities(fitted, PIXELS_NAME, val) + 0.2 * sklearn_probabilities(fitted, SPREAD_NAME, val)
    with torch.inference_mode():
        assert np.abs(loaded.network()(pixels).softmax(1).numpy() - expected).max() < TOLERANCE
    result = export(loaded, tmp_path / "best", images=val)
    assert all(c["top1_agreement"] == 1.0 for c in result.report["checks"]["fp32"].values())
    classifier = OnnxClassifier.load(tmp_path / "best", device="cpu")
    assert np.abs(classifier.probabilities(pixels.numpy()) - expected).max() < TOLERANCE
