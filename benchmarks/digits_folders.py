"""scikit-learn's digits (and its two sample photos, cut into tiles) as image folders, the way a
user's data arrives, the simple baselines, and the plain command on them.

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
    unlabelled: Path | None  # None: no unlabelled images, no --unlabelled
    test: list[Path]
    test_labels: np.ndarray
    train_pixels: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray


def write_digits(root: Path, per_class: int, *, size: int = 32, fmt: str = "png", seed: int = 0, test_fraction: float = 0.3) -> DigitFolders:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = [Image.fromarray((row.reshape(8, 8) / 16 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC) for row in x]
    return _write(root, images, y, per_class, seed, test_fraction, fmt)


def _write(root: Path, images: list, y: np.ndarray, per_class: int, seed: int, test_fraction: float, fmt: str) -> DigitFolders:
    """A stratified held-out test split, ``per_class`` labelled images a class from the rest,
    every other image unlabelled; written as folders."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(rest[y[rest] == c], per_class, replace=False) for c in np.unique(y)])
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


def write_photo_patches(root: Path, per_class: int, *, size: int = 25, seed: int = 0, test_fraction: float = 0.3) -> DigitFolders:
    """Real photos, not scans: scikit-learn's two sample photos (a temple, a flower) cut into
    ``size``-px grayscale tiles, one class each (425 tiles a class at 25 px), in the same layout
    as :func:`write_digits`. Logistic regression on their pixels scores about 0.71."""
    from sklearn.datasets import load_sample_images

    tiles, labels = [], []
    for label, photo in enumerate(load_sample_images().images):
        gray = np.asarray(Image.fromarray(photo).convert("L"))
        for top in range(0, gray.shape[0] - size + 1, size):
            for left in range(0, gray.shape[1] - size + 1, size):
                tiles.append(gray[top : top + size, left : left + size])
                labels.append(label)
    return _write(root, [Image.fromarray(tile) for tile in tiles], np.asarray(labels), per_class, seed, test_fraction, "png")


def logistic_regression_accuracy(folders: DigitFolders) -> float:
    """The one-line baseline: scikit-learn's LogisticRegression on the labelled images' pixels."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000).fit(folders.train_pixels, folders.train_labels)
    return float(model.score(folders.test_pixels, folders.test_labels))


def fixed_recipe_accuracy(folders: DigitFolders, backbone: str = "resnet18", *, epochs: int = 30, batch_size: int = 16, seed: int = 0) -> float:
    """The other simple baseline: one fixed recipe, ``backbone`` from scratch for ``epochs`` epochs on the labelled images.

    As one writes it without a search: AdamW (lr 1e-3, weight decay 0.05) on a cosine schedule,
    label smoothing 0.1, random shifts of up to 4 px (no flips: they change digits), the last
    epoch's model scored on the test images.
    """
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    values = folders.train_pixels.shape[1]
    channels = 1 if round(np.sqrt(values)) ** 2 == values else 3  # grayscale side**2, or RGB 3 * side**2 (channels first)
    side = round(np.sqrt(values // channels))

    def tensors(pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).view(-1, channels, side, side).expand(-1, 3, -1, -1)
        return (x - 0.5) / 0.25

    x, y = tensors(folders.train_pixels), torch.from_numpy(folders.train_labels).long()
    model = timm.create_model(backbone, pretrained=False, num_classes=int(y.max()) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * -(-len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(batch_size):
            padded = F.pad(x[batch], (4, 4, 4, 4), value=float(x.min()))
            shifts = torch.randint(0, 9, (len(batch), 2)).tolist()
            shifted = torch.stack([image[:, dy : dy + side, dx : dx + side] for image, (dx, dy) in zip(padded, shifts)])
            loss = F.cross_entropy(model(shifted), y[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(part).argmax(1) for part in tensors(folders.test_pixels).split(256)])
    return float((predicted.numpy() == folders.test_labels).mean())


@dataclass
class SearchRun:
    seconds: float
    returncode: int
    test_accuracy: float | None
    metrics: dict
    output: str


def run_search(folders: DigitFolders, out: Path, timeout: str, backbone: str = "resnet18", extra: tuple[str, ...] = ()) -> SearchRun:
    """``autoft search --backbone B --data D [--unlabelled U] --timeout T``, no tuning flags, timed from outside."""
    unlabelled = ["--unlabelled", str(folders.unlabelled)] if folders.unlabelled is not None else []
    command = [str(Path(sys.executable).parent / "autoft"), "search", "--backbone", backbone, "--data", str(folders.labelled), *unlabelled, "--timeout", timeout, "--out", str(out), *extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    metrics_file = out / "best" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    accuracy = test_accuracy(out / "best", folders) if done.returncode == 0 else None
    return SearchRun(seconds, done.returncode, accuracy, metrics, done.stdout + done.stderr)


def test_accuracy(model_dir: Path, folders: DigitFolders) -> float:
    """Accuracy of the exported ONNX model on the held-out images, through autoft's own predict path."""
    from autoft.deploy.inference import OnnxClassifier

    classifier = OnnxClassifier.load(model_dir)
    probabilities = np.concatenate([classifier.probabilities(classifier.pixels(folders.test[i : i + 256])) for i in range(0, len(folders.test), 256)])
    predicted = np.asarray([classifier.classes[k] for k in probabilities.argmax(1)])
    truth = np.asarray([path.parent.name for path in folders.test])  # each test image lies in its class's folder
    return float((predicted == truth).mean())


def time_bound(timeout: str) -> float:
    """The most a run of ``--timeout`` may take, timed from outside: T x 1.05 + 30 s (issue 20's bound)."""
    return 1.05 * parse_seconds(timeout) + 30


def parse_seconds(timeout: str) -> float:
    from autoft.searching import parse_duration

    return float(parse_duration(timeout))
