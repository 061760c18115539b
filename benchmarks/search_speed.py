"""The same search, written the common way and run as ``autoft search``: wall time and test accuracy.

Data: scikit-learn's digits written as PNG files, ``--per-class`` labelled images per class in
``train/`` and ``--test-per-class`` others in ``test/``. Both searches use the same backbone,
image size, trial count and epoch cap, and both start from scratch as separate processes, timed
from outside (interpreter start and imports included):

* **common way**: torchvision ``ImageFolder`` + ``DataLoader`` (PIL decodes every image every
  epoch, in ``--loader-workers`` processes; each count given is timed as its own run), a validation split carved from train (20 %, stratified, as autoft does), a plain Optuna
  TPE objective over lr, weight decay and dropout that runs every epoch (no pruning), and the
  best trial's best epoch scored on ``test/``;
* **autoft**: ``autoft search`` on the same folder (``--device D --no-cv``, the same single validation split; defaults otherwise: pruning, refit,
  strategies, ONNX export of the best model, report), its test accuracy from ``best/metrics.json``.

The digits are 8-px scans; ``--source-size 256 --format jpeg`` writes them as 256-px JPEGs
instead, the size and format of a user's photos, where decoding costs what it costs on real
folders.

    python benchmarks/search_speed.py [--backbone test_resnet] [--trials 12] [--epochs 8] [--per-class 10]
    python benchmarks/search_speed.py --per-class 30 --source-size 1024 --format jpeg --image-size 64 --batch-size 32 --loader-workers 0,2
    python benchmarks/search_speed.py --device cuda --backbone resnet18 --per-class 60 --image-size 128 \
        --source-size 256 --format jpeg --loader-workers 0,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_digits(root: Path, per_class: int, test_per_class: int, seed: int, source_size: int | None = None, fmt: str = "png") -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        for split, chosen in (("train", index[:per_class]), ("test", index[per_class : per_class + test_per_class])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                image = Image.fromarray((digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8))
                if source_size:
                    image = image.resize((source_size, source_size), Image.Resampling.BICUBIC)
                image.save(folder / f"{i}.{'jpg' if fmt == 'jpeg' else fmt}")


def common_way(root: Path, backbone: str, trials: int, epochs: int, image_size: int, batch_size: int, seed: int, device: str, workers: int) -> dict:
    """The search as one usually writes it: ImageFolder, DataLoader, an Optuna objective without pruning."""
    import copy

    import numpy as np
    import optuna
    import timm
    import torch
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(seed)
    config = timm.create_model(backbone, pretrained=False).pretrained_cfg
    normalize = T.Normalize(config["mean"], config["std"])
    augment = T.Compose([T.Resize(image_size, T.InterpolationMode.BICUBIC), T.RandomResizedCrop(image_size, scale=(0.5, 1.0)), T.ToTensor(), normalize])
    plain = T.Compose([T.Resize(image_size, T.InterpolationMode.BICUBIC), T.CenterCrop(image_size), T.ToTensor(), normalize])
    labelled = datasets.ImageFolder(root / "train", transform=augment)
    keep, held = train_test_split(np.arange(len(labelled)), test_size=0.2, stratify=labelled.targets, random_state=seed)
    loading = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device != "cpu"}
    train = DataLoader(Subset(labelled, keep), batch_size=batch_size, shuffle=True, **loading)
    val = DataLoader(Subset(datasets.ImageFolder(root / "train", transform=plain), held), batch_size=256, **loading)
    test = DataLoader(datasets.ImageFolder(root / "test", transform=plain), batch_size=256, **loading)

    def accuracy(model, loader) -> float:
        model.eval()
        with torch.inference_mode():
            right = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in loader)
        return right / len(loader.dataset)

    best = {"value": -1.0, "state": None}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 0.1, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        model = timm.create_model(backbone, num_classes=len(labelled.classes), drop_rate=dropout).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
        trial_best = 0.0
        for _ in range(epochs):
            model.train()
            for x, y in train:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
            value = accuracy(model, val)
            trial_best = max(trial_best, value)
            if value > best["value"]:
                best.update(value=value, state=copy.deepcopy(model.state_dict()), dropout=dropout)
        return trial_best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    model = timm.create_model(backbone, num_classes=len(labelled.classes), drop_rate=best["dropout"]).to(device)
    model.load_state_dict(best["state"])
    return {"val_accuracy": best["value"], "test_accuracy": accuracy(model, test)}


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=10, help="labelled training images per class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--loader-workers", default="0", help="DataLoader processes of the common way; a list (0,8) times each")
    parser.add_argument("--source-size", type=int, default=None, help="write the digits at this size (default: their own 8 px)")
    parser.add_argument("--format", default="png", choices=["png", "jpeg"])
    parser.add_argument("--common-way-in", type=Path, help=argparse.SUPPRESS)  # the child process that runs the common way
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.common_way_in:
        result = common_way(args.common_way_in, args.backbone, args.trials, args.epochs, args.image_size, args.batch_size, args.seed,
                            args.device, int(args.loader_workers))  # fmt: skip
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="autoft-search-speed-") as work:
        root = Path(work) / "digits"
        write_digits(root, args.per_class, args.test_per_class, args.seed, args.source_size, args.format)
        env = {**os.environ, "AUTOFT_CACHE_DIR": str(Path(work) / "cache"), "PYTHONWARNINGS": "ignore"}
        stored = f"{args.source_size or 8}-px {args.format.upper()}"
        print(f"{10 * args.per_class} labelled digits ({10 * args.test_per_class} test) as {stored} trained at {args.image_size}px, {args.backbone}, "
              f"{args.trials} trials of at most {args.epochs} epochs, batch {args.batch_size}, {args.device}, {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        # autoft first: the shorter run, so a run cut off by a time limit still has its figure
        out = Path(work) / "autoft-run"
        autoft_args = ["search", "--backbone", args.backbone, "--data", str(root), "--out", str(out), "--trials", str(args.trials), "--epochs", str(args.epochs),
                       "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device, "--no-cv"]  # fmt: skip
        autoft_seconds, _ = timed([sys.executable, "-c", "from autoft.cli import main; main()", *autoft_args], env)
        metrics = json.loads((out / "best" / "metrics.json").read_text())
        print(f"autoft: {autoft_seconds:6.1f} s, test accuracy {metrics['test_accuracy']:.4f}")
        commons = []
        for workers in args.loader_workers.split(","):
            common_args = ["--backbone", args.backbone, "--trials", str(args.trials), "--epochs", str(args.epochs), "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device, "--loader-workers", workers,
                           "--common-way-in", str(root)]  # fmt: skip
            seconds, done = timed([sys.executable, __file__, *common_args], env)
            common = json.loads(done.stdout.strip().splitlines()[-1])
            commons.append((f"common way, {workers} loader workers", seconds, common["test_accuracy"]))
            print(f"{commons[-1][0]}: {seconds:6.1f} s, test accuracy {common['test_accuracy']:.4f}", flush=True)

        for name, seconds, accuracy in commons:
            print(f"autoft against the {name}: {seconds / autoft_seconds:.2f}x the speed, "
                  f"{100 * (metrics['test_accuracy'] - accuracy):+.1f} points of test accuracy")  # fmt: skip


if __name__ == "__main__":
    main()
