"""Does the plain command beat the one-line baseline on small data?

scikit-learn's digits as 32-px PNGs: a held-out test split (30%), 5, 10 and 30 labelled
images a class, every other image unlabelled. For each size it runs what a user would::

    autoft search --backbone resnet18 --data D --unlabelled U --timeout 6m

with no tuning flags, and prints the test accuracy of the exported model against
scikit-learn's LogisticRegression on the labelled images' pixels, measured in the same
run. Goal: above logistic regression at every size, and 8 points above at 10 a class.

    python benchmarks/small_data.py [--timeout 6m] [--sizes 5 10 30] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from digits_folders import logistic_regression_accuracy, parse_seconds, run_search, write_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", default="6m")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 30])
    parser.add_argument("--keep", type=Path, default=None, help="write the data and the runs here instead of a temporary folder")
    args = parser.parse_args()
    budget = parse_seconds(args.timeout)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for per_class in args.sizes:
            folders = write_digits(Path(tmp) / f"digits{per_class}", per_class)
            baseline = logistic_regression_accuracy(folders)
            run = run_search(folders, Path(tmp) / f"run{per_class}", args.timeout, args.backbone)
            if run.test_accuracy is None:
                print(run.output[-3000:])
            rows.append((per_class, run, baseline))
            print(f"{per_class}/class: autoft {run.test_accuracy} vs logistic regression {baseline:.3f}, {run.seconds:.0f}s of {budget:.0f}s", flush=True)
    print()
    print("| labelled a class | autoft search test acc. | logistic regression on pixels | difference | wall time / budget | best model |")
    print("|---|---|---|---|---|---|")
    for per_class, run, baseline in rows:
        accuracy = f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else f"failed (exit {run.returncode})"
        diff = f"{100 * (run.test_accuracy - baseline):+.1f} points" if run.test_accuracy is not None else "-"
        model = run.metrics.get("summary", "-")
        print(f"| {per_class} | {accuracy} | {baseline:.3f} | {diff} | {run.seconds:.0f}s / {budget:.0f}s ({run.seconds / budget:.2f}x) | {model} |")


if __name__ == "__main__":
    main()
