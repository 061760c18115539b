"""Does the plain command beat the one-line baseline on small data?

scikit-learn's digits as 32-px PNGs: a held-out test split (30%), 5, 10 and 30 labelled
images a class, every other image unlabelled. For each size it runs what a user would::

    autoft search --backbone resnet18 --data D --unlabelled U --timeout 6m

with no tuning flags, and prints the test accuracy of the exported model against two simple
baselines measured in the same run: scikit-learn's LogisticRegression on the labelled images'
pixels, and a fixed recipe (the same backbone from scratch, 30 epochs, batch 16) trained on
the labelled images. Goal: above logistic regression at every size, and 8 points above at 10 a
class.

``--data photos`` runs the same on real photos instead of scans: scikit-learn's two sample
photos cut into 25-px grayscale tiles, one class each (``write_photo_patches``).

    python benchmarks/small_data.py [--timeout 6m] [--sizes 5 10 30] [--seeds 0 1 2] [--keep DIR]
    python benchmarks/small_data.py --data photos --sizes 30

``--seeds`` draws other labelled images and test splits, and seeds the fixed recipe and the
search alike: the spread over seeds is the noise a figure is within.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from digits_folders import fixed_recipe_accuracy, logistic_regression_accuracy, parse_seconds, run_search, write_digits, write_photo_patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", default="6m")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 30])
    parser.add_argument("--data", choices=["digits", "photos"], default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the draw of labelled and test images, and the runs' seeds")
    parser.add_argument("--keep", type=Path, default=None, help="write the data and the runs here instead of a temporary folder")
    args = parser.parse_args()
    budget = parse_seconds(args.timeout)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for per_class in args.sizes:
            for seed in args.seeds:
                write = write_digits if args.data == "digits" else write_photo_patches
                folders = write(Path(tmp) / f"{args.data}{per_class}-seed{seed}", per_class, seed=seed)
                baseline = logistic_regression_accuracy(folders)
                started = time.monotonic()
                fixed = fixed_recipe_accuracy(folders, args.backbone, seed=seed)
                fixed_seconds = time.monotonic() - started
                run = run_search(folders, Path(tmp) / f"run{per_class}-seed{seed}", args.timeout, args.backbone, extra=("--seed", str(seed)))
                if run.test_accuracy is None:
                    print(run.output[-3000:])
                rows.append((per_class, seed, run, baseline, fixed, fixed_seconds))
                print(f"{per_class}/class seed {seed}: autoft {run.test_accuracy} vs logistic regression {baseline:.3f}, fixed recipe {fixed:.3f} ({fixed_seconds:.0f}s); "
                      f"{run.seconds:.0f}s of {budget:.0f}s", flush=True)  # fmt: skip
    print()
    print(f"| labelled a class | seed | autoft search test acc. | logistic regression on pixels | difference | fixed {args.backbone}, 30 epochs | difference | wall time / budget | best model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for per_class, seed, run, baseline, fixed, fixed_seconds in rows:
        accuracy = f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else f"failed (exit {run.returncode})"

        def above(reference: float) -> str:
            return f"{100 * (run.test_accuracy - reference):+.1f} points" if run.test_accuracy is not None else "-"

        model = run.metrics.get("summary", "-")
        print(f"| {per_class} | {seed} | {accuracy} | {baseline:.3f} | {above(baseline)} | {fixed:.3f} ({fixed_seconds:.0f}s) | {above(fixed)} | "
              f"{run.seconds:.0f}s / {budget:.0f}s ({run.seconds / budget:.2f}x) | {model} |")  # fmt: skip

    for per_class in args.sizes:
        scores = [run.test_accuracy for size, _, run, *_ in rows if size == per_class and run.test_accuracy is not None]
        if len(scores) > 1:
            print(f"{per_class}/class over {len(scores)} seeds: autoft mean {statistics.mean(scores):.3f}, "
                  f"from {min(scores):.3f} to {max(scores):.3f} (sd {statistics.stdev(scores):.3f})")


if __name__ == "__main__":
    main()
