"""autoft predict: images and folders in, labels and probabilities out, through onnxruntime."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from autoft.cli import make_app
from autoft.errors import AutoftError
from autoft.deploy.inference import OnnxClassifier, providers_for
from autoft.deploy.predict import MIN_IMAGES_FOR_ONE_CLASS, degenerate_predictions, predict
from autoft.model.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, digits) -> Path:
    """Six validation digits as PNG files, two of them in a subfolder, plus one broken file."""
    root = tmp_path_factory.mktemp("digit_images")
    for i in range(6):
        folder = root / "more" if i >= 4 else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(digits.val.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}_label{digits.val.labels[i].item()}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_predictions_match_pytorch_on_the_same_pixels(digits_run, digits_onnx, digit_folder, digits):
    with pytest.warns(UserWarning, match="skipped .*broken.png"):
        predictions = predict(digits_onnx / "model.onnx", [digit_folder], top_k=3, batch_size=4)
    assert [Path(p.path).name for p in predictions] == [f"{i}_label{digits.val.labels[i].item()}.png" for i in range(6)]
    with torch.inference_mode():
        expected = load_checkpoint(digits_run).network()(digits.val.images[:6].float().div(255)).softmax(1).numpy()
    for p, row in zip(predictions, expected):
        assert len(p.labels) == 3
        assert p.labels[0][0] == str(row.argmax())
        np.testing.assert_allclose([prob for _, prob in p.labels], np.sort(row)[::-1][:3], atol=1e-5)


def test_cli_formats(digits_onnx, digit_folder):
    image = str(next(digit_folder.glob("0_label*.png")))
    app = make_app()
    as_json = CliRunner().invoke(app, ["predict", str(digits_onnx), image, "--top-k", "2", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert rows[0]["path"] == image and len(rows[0]["predictions"]) == 2
    assert rows[0]["predictions"][0]["probability"] >= rows[0]["predictions"][1]["probability"]

    as_csv = CliRunner().invoke(app, ["predict", str(digits_onnx), image, "--top-k", "2", "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["rank"] for r in table] == ["1", "2"]
    assert table[0]["label"] == rows[0]["predictions"][0]["label"]

    as_table = CliRunner().invoke(app, ["predict", str(digits_onnx), image])
    assert as_table.exit_code == 0 and rows[0]["predictions"][0]["label"] in as_table.stdout


def test_bad_input_is_one_line(digits_run, digits_onnx, tmp_path):
    app = make_app()
    missing = CliRunner().invoke(app, ["predict", str(digits_onnx), str(tmp_path / "nope.png")])
    assert missing.exit_code == 2 and "not found" in missing.output
    unexported = CliRunner().invoke(app, ["predict", str(digits_run), str(tmp_path)])
    assert unexported.exit_code == 2 and "autoft export" in unexported.output
    bad_format = CliRunner().invoke(app, ["predict", str(digits_onnx), str(tmp_path), "--format", "xml"])
    assert bad_format.exit_code == 2 and "unknown format" in bad_format.output
    with pytest.raises(AutoftError, match="no images"):
        with pytest.warns(UserWarning):
            predict(digits_onnx, [tmp_path])


def test_cpu_provider_without_a_gpu_and_no_provider_noise(digits_onnx, digit_folder):
    """onnxruntime-gpu lists CUDA even with no GPU; only a usable GPU may be chosen."""
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available() else ["CPUExecutionProvider"]
    assert providers_for("auto") == expected
    assert OnnxClassifier.load(digits_onnx).providers == expected
    run = subprocess.run(
        [str(Path(sys.executable).with_name("autoft")), "predict", str(digits_onnx), str(digit_folder / "more"), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)) == 2
    assert "Provider" not in run.stderr and "CUDA" not in run.stderr and "[E:" not in run.stderr and "[W:" not in run.stderr


def test_a_model_with_nan_weights_is_refused_in_one_line_not_printed_as_nan(nan_onnx, digit_folder):
    run = subprocess.run(
        [str(Path(sys.executable).with_name("autoft")), "predict", str(nan_onnx), str(digit_folder / "more"), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stdout == ""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert lines[0].startswith("error: ") and "not finite" in lines[0] and "probe batch" in lines[0]


def test_non_finite_outputs_after_the_probe_are_refused_naming_the_image(digits_onnx, digit_folder):
    classifier = OnnxClassifier.load(digits_onnx, device="cpu")
    sound = classifier.logits
    classifier.logits = lambda pixels: sound(pixels) if len(pixels) == 4 else np.full_like(sound(pixels), np.inf)  # the probe batch is 4 images
    with pytest.raises(AutoftError, match=r"not finite \(0 NaN and 20 infinite of 20\) for 2 image\(s\), first .*\.png"):
        predict(classifier, [digit_folder / "more"], batch_size=2)


# ---------------------------------------------------------------------------
# A model that has not learned is called out


def confident(n: int, classes: int, seed: int = 0) -> np.ndarray:
    """Peaked rows with varied winners: what a model that learned gives."""
    rng = np.random.default_rng(seed)
    rows = np.full((n, classes), 0.1 / (classes - 1))
    rows[np.arange(n), rng.integers(0, classes, n)] = 0.9
    return rows


def test_near_uniform_predictions_are_named_with_the_numbers():
    classes = ["cat", "coffee", "car", "cup", "cow"]
    flat = np.full((12, 5), 0.2) + np.random.default_rng(0).normal(0, 0.005, (12, 5))
    message = degenerate_predictions(flat / flat.sum(1, keepdims=True), classes)
    assert message and "near-uniform" in message and "100% of 12 image(s)" in message and "0.200 for a guess among 5 classes" in message
    assert degenerate_predictions(confident(12, 5), classes) is None
    assert degenerate_predictions(np.array([[0.52, 0.48], [0.47, 0.53], [0.51, 0.49]])) is not None  # two classes: a coin toss
    assert degenerate_predictions(np.array([[0.8, 0.2], [0.3, 0.7], [0.51, 0.49]])) is None  # one unsure image of three


def test_one_class_for_every_image_is_named_only_when_the_batch_says_something():
    collapsed = np.tile([0.05, 0.9, 0.05], (MIN_IMAGES_FOR_ONE_CLASS, 1))
    message = degenerate_predictions(collapsed, ["red", "green", "blue"])
    assert message and f"'green' for all {MIN_IMAGES_FOR_ONE_CLASS} images" in message
    assert degenerate_predictions(collapsed[:5], ["red", "green", "blue"]) is None  # five photos of one thing are no sign


class ConstantSession:
    """An onnxruntime session stand-in whose model answers the same logits for every image."""

    def __init__(self, logits):
        self.row = np.asarray(logits, dtype=np.float32)

    def run(self, outputs, feeds):
        return [np.tile(self.row, (len(next(iter(feeds.values()))), 1))]


def test_predict_warns_once_when_the_model_predicts_chance(digit_folder, monkeypatch):
    flat = OnnxClassifier(ConstantSession(np.zeros(5)), Path("model.onnx"), "flat", ["cat", "coffee", "car", "cup", "cow"], 16, "input", "logits")
    monkeypatch.setattr(OnnxClassifier, "load", classmethod(lambda cls, model, device="auto", threads=None: flat))
    result = CliRunner().invoke(make_app(), ["predict", "unused.onnx", str(digit_folder), "--batch-size", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(result.stdout)[0]["predictions"][0]["probability"]] == [pytest.approx(0.2)]
    warned = [line for line in result.stderr.splitlines() if "near-uniform" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: the model's predictions are near-uniform: for 100% of 6 image(s)")


def test_a_trained_model_is_not_called_degenerate(digits_onnx, digit_folder):
    result = CliRunner().invoke(make_app(), ["predict", str(digits_onnx), str(digit_folder)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "near-uniform" not in result.stderr and "for all" not in result.stderr
