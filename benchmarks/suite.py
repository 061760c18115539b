"""Does the plain command beat the simple models on real sets it was not tuned on?

For each of eight image sets (``image_sets.py``: half ``tuning``, half ``held-out``), each
``--timeout`` and each seed, it runs what a user would::

    autoft search --backbone resnet18 --data SET/train [--unlabelled SET/unlabelled] --timeout T --seed S

in a subprocess, with no tuning flags, scores the exported ``best/`` model on the set's test
images, and compares it with the best of three simple candidates measured in the same run:
logistic regression on the pixels, a fixed recipe (the backbone from scratch, 30 epochs,
batch 16, AdamW, cosine, shifts) and a linear probe on the backbone's starting features
(random, or ``--weights``). Each cell prints autoft against the best simple candidate, the
difference, and the wall time against the bound T x 1.05 + 30 s. The summary gives the
mean difference at the longest timeout and names every cell below the best simple
candidate by more than seed noise (twice the standard error over seeds and test images).

    python benchmarks/suite.py [--sets digits textures] [--timeouts 1m 2m 6m] [--seeds 0 1]
        [--backbone resnet18] [--weights auto] [--only tuning|held-out] [--keep DIR] [--markdown]

The whole suite is hours on a 2-core CPU: 8 sets x 3 timeouts x seeds, plus the fixed recipes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits_folders import DigitFolders, SearchRun, fixed_recipe_accuracy, logistic_regression_accuracy, parse_seconds, run_search, time_bound
from image_sets import ROLES, SETS, build, write


@dataclass
class Simple:
    """The simple candidates on one set, for one seed."""

    logistic: float
    fixed: float
    probe: float
    seconds: float
    fixed_seconds: float  # the fixed recipe's own training time, not bound by --timeout (10 to 63 s on the held-out sets)

    def best(self) -> tuple[str, float]:
        return max((("logistic regression", self.logistic), ("fixed recipe", self.fixed), ("linear probe", self.probe)), key=lambda c: c[1])


@dataclass
class Cell:
    name: str
    role: str
    timeout: str
    seed: int
    run: SearchRun
    simple: Simple
    tests: int

    @property
    def bound(self) -> float:
        return time_bound(self.timeout)

    @property
    def difference(self) -> float | None:
        return None if self.run.test_accuracy is None else self.run.test_accuracy - self.simple.best()[1]


def probe_accuracy(folders: DigitFolders, backbone: str, weights: str | None, seed: int) -> float:
    """Logistic regression on the backbone's pooled features of the starting weights (what ``--weights`` resolves to)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from autoft.model.backbones import build_backbone
    from autoft.training.pretraining import embed_all
    from autoft.model.weights import resolve_weights

    torch.manual_seed(seed)
    resolved, _ = resolve_weights(weights or "auto", backbone)
    net = build_backbone(backbone, num_classes=int(folders.train_labels.max()) + 1, weights=resolved)
    values = folders.train_pixels.shape[1]
    channels = 1 if round(math.sqrt(values)) ** 2 == values else 3
    side = round(math.sqrt(values // channels))

    def features(pixels: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.round(pixels * 255).astype(np.uint8)).view(-1, channels, side, side).expand(-1, 3, -1, -1).contiguous()
        with torch.inference_mode():
            return embed_all(net, images, torch.device("cpu")).numpy()

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features(folders.train_pixels), folders.train_labels)
    return float(model.score(features(folders.test_pixels), folders.test_labels))


def simple_candidates(folders: DigitFolders, backbone: str, weights: str | None, seed: int) -> Simple:
    started = time.monotonic()
    logistic = logistic_regression_accuracy(folders)
    fixed_started = time.monotonic()
    fixed = fixed_recipe_accuracy(folders, backbone, seed=seed)
    fixed_seconds = time.monotonic() - fixed_started
    probe = probe_accuracy(folders, backbone, weights, seed)
    return Simple(logistic, fixed, probe, time.monotonic() - started, fixed_seconds)


def describe(cell: Cell) -> str:
    best_name, best = cell.simple.best()
    accuracy = f"{cell.run.test_accuracy:.3f}" if cell.run.test_accuracy is not None else f"failed (exit {cell.run.returncode})"
    difference = f"{100 * cell.difference:+.1f} points" if cell.difference is not None else "-"
    within = "within" if cell.run.seconds <= cell.bound else "OVER"
    return (f"{cell.name} [{cell.role}] --timeout {cell.timeout} --seed {cell.seed}: autoft {accuracy} vs {best_name} {best:.3f} ({difference}); "
            f"logistic {cell.simple.logistic:.3f}, fixed {cell.simple.fixed:.3f} (trained {cell.simple.fixed_seconds:.0f}s), probe {cell.simple.probe:.3f}; "
            f"{cell.run.seconds:.0f}s, {within} the bound {cell.bound:.0f}s")  # fmt: skip


def below_noise(cells: list[Cell]) -> list[str]:
    """Set and timeout cells whose mean difference over seeds is below minus twice its standard error
    (the seeds' spread, and the binomial error of the test images)."""
    flagged = []
    for key in dict.fromkeys((c.name, c.timeout) for c in cells):
        group = [c for c in cells if (c.name, c.timeout) == key]
        scored = [c for c in group if c.difference is not None]
        if len(scored) < len(group):
            flagged.append(f"{key[0]} at {key[1]}: {len(group) - len(scored)} of {len(group)} runs failed")
            continue
        differences = np.asarray([c.difference for c in scored])
        accuracy = float(np.mean([c.run.test_accuracy for c in scored]))
        spread = float(differences.std(ddof=1)) ** 2 / len(scored) if len(scored) > 1 else 0.0
        noise = 2 * math.sqrt(spread + accuracy * (1 - accuracy) / group[0].tests)
        if differences.mean() < -noise:
            flagged.append(f"{key[0]} at {key[1]}: {100 * differences.mean():+.1f} points (noise {100 * noise:.1f})")
    return flagged


def summary(cells: list[Cell], timeouts: list[str]) -> list[str]:
    longest = max(timeouts, key=parse_seconds)
    lines = []
    for role in ("tuning", "held-out"):
        at = [c.difference for c in cells if c.timeout == longest and c.role == role and c.difference is not None]
        if at:
            lines.append(f"mean difference at {longest} on {role} sets: {100 * np.mean(at):+.1f} points over {len(at)} runs")
    flagged = below_noise(cells)
    lines.append(f"below the best simple candidate beyond seed noise: {'; '.join(flagged) if flagged else 'none'}")
    over = [f"{c.name} {c.timeout} seed {c.seed} ({c.run.seconds:.0f}s)" for c in cells if c.run.seconds > c.bound]
    lines.append(f"over the time bound: {', '.join(over) if over else 'none'}")
    return lines


def markdown(cells: list[Cell]) -> list[str]:
    rows = ["| set | role | --timeout | seed | autoft | logistic regression | fixed recipe (its training time) | linear probe | difference to the best | wall time / bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        accuracy = f"{c.run.test_accuracy:.3f}" if c.run.test_accuracy is not None else f"failed ({c.run.returncode})"
        difference = f"{100 * c.difference:+.1f}" if c.difference is not None else "-"
        rows.append(f"| {c.name} | {c.role} | {c.timeout} | {c.seed} | {accuracy} | {c.simple.logistic:.3f} | {c.simple.fixed:.3f} ({c.simple.fixed_seconds:.0f}s) | {c.simple.probe:.3f} | {difference} | {c.run.seconds:.0f}s / {c.bound:.0f}s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--timeouts", nargs="+", default=["1m", "2m", "6m"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default=None, help="passed to autoft search as --weights, and the linear probe's starting weights (default: auto)")
    parser.add_argument("--only", choices=["tuning", "held-out"], default=None)
    parser.add_argument("--keep", type=Path, default=None, help="write the sets and the runs here instead of a temporary folder")
    parser.add_argument("--markdown", action="store_true", help="print a table at the end")
    args = parser.parse_args()
    names = [name for name in args.sets if args.only in (None, ROLES[name])]
    print("tuning sets: " + ", ".join(n for n in names if ROLES[n] == "tuning") + "; held-out sets: " + ", ".join(n for n in names if ROLES[n] == "held-out"))
    extra = ("--weights", args.weights) if args.weights else ()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        for name in names:
            image_set = build(name)
            folders = write(image_set, root / "sets")
            print(image_set.describe(), flush=True)
            for seed in args.seeds:
                simple = simple_candidates(folders, args.backbone, args.weights, seed)
                for timeout in args.timeouts:
                    out = root / "runs" / f"{name}-{timeout}-seed{seed}"
                    run = run_search(folders, out, timeout, args.backbone, ("--seed", str(seed), *extra))
                    cell = Cell(name, image_set.role, timeout, seed, run, simple, len(folders.test))
                    cells.append(cell)
                    print(describe(cell), flush=True)
                    print(f"  {run.metrics.get('plan', {}).get('line', '')}" if run.returncode == 0 else run.output[-2000:], flush=True)
    print()
    for line in summary(cells, args.timeouts):
        print(line)
    if args.markdown:
        print()
        print("\n".join(markdown(cells)))


if __name__ == "__main__":
    main()
