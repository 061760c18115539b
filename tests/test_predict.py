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
from autoft.inference import OnnxClassifier, providers_for
from autoft.predict import predict
from autoft.training import load_checkpoint


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
