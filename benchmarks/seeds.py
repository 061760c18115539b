"""Does averaging the shipped recipe's refit over seeds beat one fit of it?

A search that ends with time it cannot spend on another trial trains the shipped recipe again
on every labelled image from other seeds and averages the fits (``autoft.searching.finishing.add_seeds``).
This measures what that buys, paired, on the sets of ``image_sets.py``: for each set and seed it runs

    autoft search --backbone resnet18 --data SET/train --trials 1 --no-cv --no-simple-models
        --timeout 30m --seed S --ensemble 3

(one trial, the default recipe; the time left then always holds two more fits), scores each of
the three fits in ``refit/`` alone on the set's test images, and the average of the first k, and
prints the average of three against the mean of the fits alone: the gain expected from the
average over one fit, with no other difference between them.

    python benchmarks/seeds.py [--only tuning|held-out] [--sets digits ...] [--seeds 0 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from image_sets import ROLES, SETS, build, write


def fit_accuracies(run: Path, test: list[Path]) -> tuple[list[float], list[float]]:
    """(each refit alone, the average of the first k) on ``test``, through autoft's own decoding."""
    import torch

    from autoft.deploy.inference import OnnxClassifier
    from autoft.model.checkpoints import load_checkpoint

    classifier = OnnxClassifier.load(run / "best")
    truth = np.asarray([path.parent.name for path in test])
    pixels = torch.from_numpy(np.concatenate([classifier.pixels(test[i : i + 256]) for i in range(0, len(test), 256)]))
    fits = sorted((run / "refit").glob("*.pt"), key=lambda p: (len(p.stem), p.stem))  # the first refit, then seed1000, seed2000
    probabilities = []
    for path in fits:
        network = load_checkpoint(path).network().eval()
        with torch.inference_mode():
            probabilities.append(torch.cat([network(part).softmax(1) for part in pixels.split(256)]).numpy())
    accuracy = lambda p: float((np.asarray(classifier.classes)[p.argmax(1)] == truth).mean())  # noqa: E731
    return [accuracy(p) for p in probabilities], [accuracy(sum(probabilities[:k]) / k) for k in range(1, len(probabilities) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--only", choices=["tuning", "held-out"], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--keep", type=Path, default=None, help="write the sets and the runs here instead of a temporary folder")
    args = parser.parse_args()
    names = [name for name in args.sets if args.only in (None, ROLES[name])]
    autoft = str(Path(sys.executable).parent / "autoft")
    gains = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        for name in names:
            folders = write(build(name), root / "sets")
            for seed in args.seeds:
                out = root / "runs" / f"{name}-seed{seed}"
                command = [autoft, "search", "--backbone", args.backbone, "--data", str(folders.labelled), "--trials", "1", "--no-cv", "--no-simple-models",
                           "--timeout", "30m", "--seed", str(seed), "--ensemble", "3", "--out", str(out)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name} seed {seed}: the search failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                alone, averaged = fit_accuracies(out, folders.test)
                gain = averaged[-1] - statistics.mean(alone)
                gains.append(gain)
                print(f"{name} [{ROLES[name]}] seed {seed}: {len(alone)} fits alone {', '.join(f'{a:.3f}' for a in alone)} (mean {statistics.mean(alone):.3f}); "
                      f"average of the first k {', '.join(f'{a:.3f}' for a in averaged)}; the average of {len(alone)} against one fit: {100 * gain:+.1f} points", flush=True)  # fmt: skip
    if gains:
        print(f"\nthe average of the fits against one fit: {100 * statistics.mean(gains):+.2f} points over {len(gains)} runs "
              f"({sum(g > 0 for g in gains)} above, {sum(g < 0 for g in gains)} below)")  # fmt: skip


if __name__ == "__main__":
    main()
