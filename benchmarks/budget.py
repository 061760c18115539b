"""Does `autoft search --timeout T` keep its budget, and spend it?

scikit-learn's digits, 10 labelled images a class, every other image as ``--unlabelled``
and a held-out test split (30%), run as a user would with ``--timeout 2m`` and ``6m``
on 32-px PNGs, and with ``3m`` on the same images upscaled to 256-px JPEGs. For each it
prints the wall time against the budget (the bound: T + 5%, plus at most 30 s of
export), the plan chosen, the trials completed and pruned, and the test accuracy against
logistic regression on the pixels, measured in the same run.

    python benchmarks/budget.py [--backbone resnet18]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from digits_folders import logistic_regression_accuracy, parse_seconds, run_search, write_digits

RUNS = (("32-px PNG", 32, "png", "2m"), ("32-px PNG", 32, "png", "6m"), ("256-px JPEG", 256, "jpeg", "3m"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--only", type=int, nargs="*", help="run only these rows (0, 1, 2)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, size, fmt, timeout) in enumerate(RUNS):
            if args.only and i not in args.only:
                continue
            folders = write_digits(Path(tmp) / f"digits{i}", 10, size=size, fmt=fmt)
            baseline = logistic_regression_accuracy(folders)
            run = run_search(folders, Path(tmp) / f"run{i}", timeout, args.backbone)
            budget = parse_seconds(timeout)
            within = run.seconds <= 1.05 * budget + 30
            if run.returncode:
                print(run.output[-3000:])
            rows.append((label, timeout, budget, run, baseline, within))
            print(f"{label} --timeout {timeout}: {run.seconds:.0f}s, test {run.test_accuracy} vs {baseline:.3f}", flush=True)
    print()
    print("| images | --timeout | wall time | within bound | plan | trials | test acc. | logistic regression |")
    print("|---|---|---|---|---|---|---|---|")
    for label, timeout, budget, run, baseline, within in rows:
        plan = run.metrics.get("plan", {}).get("line", "-")
        states = run.metrics.get("trial_states", {})
        trials = ", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "-"
        accuracy = f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else f"failed (exit {run.returncode})"
        print(f"| {label} | {timeout} | {run.seconds:.0f}s ({run.seconds / budget:.2f}x) | {'yes' if within else 'NO'} | {plan} | {trials} | {accuracy} | {baseline:.3f} |")


if __name__ == "__main__":
    main()
