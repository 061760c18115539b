"""Where a whole refit does not fit: the best trial's own weights against the same weights
trained on, on every labelled image, for the time left.

When the time left cannot hold a refit of the shipped trial on every labelled image, the
search trains the trial's own weights on, on all of them, for the steps it holds (a warm
restart of its schedule; ``autoft.searching.finishing._continued``). This measures what that
buys, paired, on the sets of ``image_sets.py``: for each set, seed and timeout it runs

    autoft search --backbone resnet18 --data SET/train [--unlabelled SET/unlabelled]
        --timeout T --seed S --no-simple-models

(no simple model can ship, so a trial always does) and, where the search trained its trial on,
scores the trial's own weights (``trials/N/model.pt``) and the model trained on from them
(``refit/N.pt``) on the set's test images. Runs where a whole refit fitted, or nothing was
trained on, are listed and not counted.

    python benchmarks/continuation.py [--only tuning|held-out] [--sets digits ...] [--timeouts 1m] [--seeds 0 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from digits_folders import run_search
from image_sets import ROLES, SETS, build, write
from seeds import checkpoint_probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--only", choices=["tuning", "held-out"], default=None)
    parser.add_argument("--timeouts", nargs="+", default=["1m"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--keep", type=Path, default=None, help="write the sets and the runs here instead of a temporary folder")
    args = parser.parse_args()
    names = [name for name in args.sets if args.only in (None, ROLES[name])]
    gains = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        for name in names:
            folders = write(build(name), root / "sets")
            for timeout in args.timeouts:
                for seed in args.seeds:
                    out = root / "runs" / f"{name}-{timeout}-seed{seed}"
                    run = run_search(folders, out, timeout, args.backbone, ("--seed", str(seed), "--no-simple-models"))
                    label = f"{name} [{ROLES[name]}] --timeout {timeout} --seed {seed}"
                    if run.returncode != 0:
                        print(f"{label}: the search failed (exit {run.returncode}): {run.output.strip().splitlines()[-1:]}", flush=True)
                        continue
                    model = run.metrics.get("model", {})
                    refit = model.get("refit") or {}
                    if not refit.get("continued"):
                        print(f"{label}: not trained on ({'a whole refit fitted' if refit else 'no time for it'}; {run.metrics.get('summary', '')}); {run.seconds:.0f}s", flush=True)
                        continue
                    number = model["members"][0]
                    own, continued = out / "trials" / str(number) / "model.pt", out / "refit" / f"{number}.pt"
                    (mine, theirs), accuracy = checkpoint_probabilities(out, [own, continued], folders.test)
                    gain = accuracy(theirs) - accuracy(mine)
                    gains.append(gain)
                    print(f"{label}: trial {number}'s own weights {accuracy(mine):.3f}, trained on for {refit['steps']} steps on {refit['images']} images "
                          f"{accuracy(theirs):.3f} ({100 * gain:+.1f} points); shipped {run.test_accuracy:.3f}; {run.seconds:.0f}s", flush=True)  # fmt: skip
    if gains:
        print(f"\ntrained on against the trial's own weights: {100 * statistics.mean(gains):+.2f} points over {len(gains)} runs "
              f"({sum(g > 0 for g in gains)} above, {sum(g < 0 for g in gains)} below)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
