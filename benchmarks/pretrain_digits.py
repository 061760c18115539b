"""Does pretraining on unlabelled images pay off when labels are scarce?

scikit-learn's digits at 32px: a held-out test split (30%), 10 labelled images per
class for training and 5 per class for validation; every other image is unlabelled.
Two searches with the same budget (trials x epochs) and seed:

- scratch: ``init`` is not searched, every trial starts from random weights;
- pretrained: the pretraining stage runs first on the unlabelled images plus the
  labelled training ones, and ``init`` searches scratch and each of its checkpoints.

It prints the test accuracy of each search's best model and the difference. The
aim is at least +10 points. Run::

    python benchmarks/pretrain_digits.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def digits_splits(labels_per_class: int, val_per_class: int, seed: int):
    """(labelled DataSplits with a test split, unlabelled uint8 images)."""
    from autoft import plugins
    from autoft.data import DataSplits, ImageTensors
    from autoft.data.decoding import decode_all, stratified_split

    spec, argument = plugins.registry().dataset("sample:digits")
    source = spec.factory(argument)
    images, _, _ = decode_all(source.samples, 32)
    labels = np.asarray(source.labels, dtype=np.int64)
    every = ImageTensors(images, torch.from_numpy(labels))
    rest, test = stratified_split(labels, 0.3, seed)
    rng = np.random.default_rng(seed)
    train, val, unlabelled = [], [], []
    for label in np.unique(labels):
        members = rng.permutation(rest[labels[rest] == label])
        train += list(members[:labels_per_class])
        val += list(members[labels_per_class : labels_per_class + val_per_class])
        unlabelled += list(members[labels_per_class + val_per_class :])
    data = DataSplits(
        train=every.subset(sorted(train)), val=every.subset(sorted(val)), test=every.subset(test),
        classes=list(source.classes), image_size=32, hflip=False,
    )  # fmt: skip
    return data, images[np.sort(unlabelled)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--method", default="autoencoder")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import optuna

    from autoft.searching import search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    data, unlabelled = digits_splits(args.labels_per_class, 5, args.seed)
    print(
        f"digits 32px: {len(data.train)} labelled for training, {len(data.val)} for validation, "
        f"{len(unlabelled)} unlabelled, {len(data.test)} test; {args.trials} trials x {args.epochs} epochs of {args.backbone}"
    )
    budget = dict(trials=args.trials, epochs=args.epochs, seed=args.seed, device="cpu", export_onnx=False)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        scratch = search(args.backbone, data, Path(tmp) / "scratch", **budget)
        scratch_seconds = time.perf_counter() - started

        started = time.perf_counter()
        pretrained = search(
            args.backbone, data, Path(tmp) / "pretrained", unlabelled=unlabelled, pretrain=args.method,
            pretrain_epochs=args.pretrain_epochs, **budget,
        )  # fmt: skip
        pretrained_seconds = time.perf_counter() - started

    def trials(result) -> str:
        return ", ".join(f"{n} {state.lower()}" for state, n in result.states.items())

    a, b = scratch.metrics["test_accuracy"], pretrained.metrics["test_accuracy"]
    init = Path(str(pretrained.best_params.get("init", "scratch"))).stem
    print(f"scratch:    test accuracy {a:.3f}  ({scratch_seconds:.0f} s; {trials(scratch)})")
    print(
        f"pretrained: test accuracy {b:.3f}  ({pretrained_seconds:.0f} s with {args.pretrain_epochs} epochs of {args.method}; "
        f"{trials(pretrained)}; best init {init})"
    )
    print(f"difference: {100 * (b - a):+.1f} points (aim: +10)")


if __name__ == "__main__":
    main()
