"""scikit-learn's digits as image folders, the way a user's data arrives, and the plain command on them.

Shared by ``budget.py`` and ``small_data.py``: a held-out test split that no search sees,
``N`` labelled images a class as ``DIR/<class>/*.png``, every other image flat in an
unlabelled folder, logistic regression on the same pixels as the one-line baseline, and
``autoft search`` run as a user runs it, in a subprocess, timed from outside.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class DigitFolders:
    labelled: Path
    unlabelled: Path
    test: list[Path]
    test_labels: np.ndarray
    train_pixels: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray


def write_digits(root: Path, per_class: int, *, size: int = 32, fmt: str = "png", seed: int = 0, test_fraction: float = 0.3) -> DigitFolders:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = [Image.fromarray((row.reshape(8, 8) / 16 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC) for row in x]
    rest, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(rest[y[rest] == c], per_class, replace=False) for c in range(10)])
    unlabelled = np.setdiff1d(rest, labelled)
    suffix = "jpg" if fmt == "jpeg" else fmt

    def save(index: int, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.{suffix}"
        images[index].save(path)
        return path

    for i in labelled:
        save(i, root / "labelled" / str(y[i]))
    for i in unlabelled:
        save(i, root / "unlabelled")
    test_paths = [save(i, root / "test" / str(y[i])) for i in test]

    def pixels(index: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(images[i], dtype=np.float32).ravel() / 255 for i in index])

    return DigitFolders(root / "labelled", root / "unlabelled", test_paths, y[test], pixels(labelled), y[labelled], pixels(test))


def logistic_regression_accuracy(folders: DigitFolders) -> float:
    """The one-line baseline: scikit-learn's LogisticRegression on the labelled images' pixels."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000).fit(folders.train_pixels, folders.train_labels)
    return float(model.score(folders.test_pixels, folders.test_labels))


@dataclass
class SearchRun:
    seconds: float
    returncode: int
    test_accuracy: float | None
    metrics: dict
    output: str


def run_search(folders: DigitFolders, out: Path, timeout: str, backbone: str = "resnet18", extra: tuple[str, ...] = ()) -> SearchRun:
    """``autoft search --backbone B --data D --unlabelled U --timeout T``, no tuning flags, timed from outside."""
    command = [str(Path(sys.executable).parent / "autoft"), "search", "--backbone", backbone, "--data", str(folders.labelled), "--unlabelled", str(folders.unlabelled), "--timeout", timeout, "--out", str(out), *extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    metrics_file = out / "best" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    accuracy = test_accuracy(out / "best", folders) if done.returncode == 0 else None
    return SearchRun(seconds, done.returncode, accuracy, metrics, done.stdout + done.stderr)


def test_accuracy(model_dir: Path, folders: DigitFolders) -> float:
    """Accuracy of the exported ONNX model on the held-out images, through autoft's own predict path."""
    from autoft.inference import OnnxClassifier

    classifier = OnnxClassifier.load(model_dir)
    probabilities = np.concatenate([classifier.probabilities(classifier.pixels(folders.test[i : i + 256])) for i in range(0, len(folders.test), 256)])
    predicted = np.asarray([int(classifier.classes[k]) for k in probabilities.argmax(1)])
    return float((predicted == folders.test_labels).mean())


def parse_seconds(timeout: str) -> float:
    from autoft.searching import parse_duration

    return float(parse_duration(timeout))
