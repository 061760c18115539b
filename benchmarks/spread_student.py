"""Which student ships label spreading best? Test accuracy of the simple candidates.

scikit-learn's digits at 32px: 540 test digits, 10 labelled a class, every other digit
unlabelled (1157), drawn ``--draws`` times. For each draw it prints the test accuracy of
logistic regression on the labelled pixels, of label spreading on the unlabelled digits
(transductive, no model of new images), and of logistic-regression students trained on the
labelled digits plus the surest share of the spread labels (``--shares``). Run::

    python benchmarks/spread_student.py
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.8, 1.0])
    args = parser.parse_args()

    from autoft.training.baselines import fit_logistic
    from autoft.training.candidates import PixelFitter, flat_pixels
    from autoft.data import ImageTensors
    from autoft.data.decoding import load_data
    from autoft.training.semisupervised import pseudo_label

    data = load_data("sample:digits", image_size=32, seed=0)
    images = torch.cat([data.train.images, data.val.images])
    labels = torch.cat([data.train.labels, data.val.labels]).numpy()
    pixels = flat_pixels(images)
    rows = []
    for draw in range(args.draws):
        order = np.random.default_rng(draw).permutation(len(labels))
        test, rest = order[:540], order[540:]
        labelled = np.concatenate([rest[labels[rest] == c][: args.per_class] for c in range(10)])
        unlabelled = np.setdiff1d(rest, labelled)
        pool = ImageTensors(images[labelled], torch.as_tensor(labels[labelled]))
        model = PixelFitter(pool).fit_model()
        row = {"logistic regression": (model.predict(pixels[test]) == labels[test]).mean()}
        spread = pseudo_label(pool, labels[labelled], images[unlabelled], 10, seed=0)
        row["spreading (unlabelled)"] = (spread.labels == labels[unlabelled][spread.index]).mean()
        for share in args.shares:
            index, targets = spread.most_confident(share)
            student = fit_logistic(np.concatenate([pixels[labelled], pixels[unlabelled][index]]), np.concatenate([labels[labelled], targets]), standardise=False)
            row[f"student {share:g}"] = (student.predict(pixels[test]) == labels[test]).mean()
        rows.append(row)
        print(f"draw {draw}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print("mean:   " + ", ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in rows[0]))


if __name__ == "__main__":
    main()
