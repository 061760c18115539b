"""Trials finished per hour at ``--jobs 1`` and ``--jobs N`` on the same search, and the ratio.

Data: scikit-learn's digits as 32-px PNGs (``--per-class`` labelled a class). Both runs are the
same ``autoft search`` (same backbone, trial count and training length, pruning off so every
trial trains its full length, no refit, no ONNX export), each in a fresh output folder; the
figure is finished trials over the wall time of the trials stage (``timings.trials`` in
``best/metrics.json``), so the fixed costs before and after the trials do not blur it.

    python benchmarks/parallel_trials.py [--backbone test_resnet] [--jobs 2] [--trials 8] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digits_folders import write_digits


def run(data: Path, out: Path, args: argparse.Namespace, jobs: int) -> tuple[float, int, float]:
    command = [sys.executable, "-c", "from autoft.cli import main; main()", "search", "--backbone", args.backbone, "--data", str(data), "--out", str(out),
               "--jobs", str(jobs), "--trials", str(args.trials), "--epochs", str(args.epochs), "--pruner", "none", "--no-cv", "--no-refit", "--no-onnx",
               "--ensemble", "1", "--weights", "scratch", "--device", args.device]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"--jobs {jobs} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    finished = metrics["trial_states"].get("COMPLETE", 0) + metrics["trial_states"].get("PRUNED", 0)
    return metrics["timings"]["trials"], finished, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_digits(Path(tmp) / "digits", args.per_class)
        for jobs in (1, args.jobs):
            seconds, finished, wall = run(folders.labelled, Path(tmp) / f"jobs{jobs}", args, jobs)
            rows.append((jobs, seconds, finished, wall))
            print(f"--jobs {jobs}: {finished} trials in {seconds:.1f}s of trials ({wall:.1f}s in all)", flush=True)
    base = rows[0][2] / rows[0][1]
    print()
    print(f"{args.backbone}, {args.per_class * 10} labelled digits at 32 px, {args.trials} trials of {args.epochs} epochs, pruning off")
    print("| --jobs | trials | trials stage | trials per hour | ratio to --jobs 1 | whole command |")
    print("|---|---|---|---|---|---|")
    for jobs, seconds, finished, wall in rows:
        rate = finished / seconds
        print(f"| {jobs} | {finished} | {seconds:.1f}s | {3600 * rate:.0f} | {rate / base:.2f}x | {wall:.1f}s |")


if __name__ == "__main__":
    main()
