"""Training speed (images/s) of autoft's Trainer on one set held in memory and read from the disk cache.

A set larger than ``$AUTOFT_MAX_IN_MEMORY`` stays in the decoded-image cache and ``autoft
train`` reads it a batch at a time, the next batch read by a background thread while the
current one trains. This measures what that costs: the same images (class-coloured noise) are
written once as a cache entry, then a fresh backbone trains on them with ``Trainer`` for
``--steps`` optimizer steps, alternating between the set in memory and the set on disk. Speed
is taken from the Trainer's ``BatchEnd`` events after ``--warmup`` steps (validation is not
timed); each row is the median of ``--repeats`` runs, and the ratio is disk over memory,
measured in this run, after an untimed first run. ``--cold`` adds runs that first evict the entry from the page cache
(``posix_fadvise``), so that every batch comes from the device, as for a set larger than RAM.

    python benchmarks/train_from_disk.py --cold          # CPU: test_resnet at 64 px, about 2 minutes on 2 cores
    python benchmarks/train_from_disk.py --device cuda --model resnet50 --image-size 224 --batch-size 128 --cold
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from autoft import plugins
from autoft.model.backbones import build_backbone
from autoft.data import DataSplits, ImageTensors
from autoft.core.events import BatchEnd
from autoft.model.recipe import resolve_recipe
from autoft.training.trainer import Trainer, TrainerConfig
from train_throughput import disk_store  # the set written as a cache entry, as prepare() leaves one too big for memory

NUM_CLASSES = 10


def class_images(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose colour follows the label, with noise: a set the model can learn, made in chunks."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % NUM_CLASSES
    colours = torch.rand(NUM_CLASSES, 3, 1, 1, generator=generator) * 200 + 28
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    for start in range(0, count, 256):
        part = labels[start : start + 256]
        noise = torch.randn(len(part), 3, size, size, generator=generator) * 30
        images[start : start + 256] = (colours[part] + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def evict(store) -> None:
    """Drop the entry's pages from the page cache, so that the next reads come from the device."""
    fd = os.open(store.file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def images_per_second(data: DataSplits, args, device: torch.device) -> float:
    torch.manual_seed(0)
    backbone = build_backbone(args.model, num_classes=NUM_CLASSES)
    stamps: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, BatchEnd):
            if device.type == "cuda" and event.step in (args.warmup, args.steps):
                torch.cuda.synchronize()  # the GPU runs ahead of the host: time what it finished
            stamps.append(time.perf_counter())

    config = TrainerConfig(steps=args.steps, eval_every=args.steps, batch_size=args.batch_size, device=device, seed=0)
    registry = plugins.registry()
    recipe = resolve_recipe({"strategy": "freeze"}, len(backbone.groups), registry)  # autoft train's defaults: everything trains, crop-flip augmentation
    Trainer(backbone, data, recipe, config, registry=registry, on_event=on_event).fit()
    timed = stamps[args.warmup - 1 :]
    return (len(timed) - 1) * args.batch_size / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=4096, help="training images (validation: one batch more)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time runs that read every batch from the device, not the page cache")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()

    count = args.images + args.batch_size
    images, labels = class_images(count, args.image_size)
    with tempfile.TemporaryDirectory(prefix="autoft-from-disk-") as root:
        store = disk_store(images, root)
        every = {"in memory": ImageTensors(images, labels), "on disk": ImageTensors(store, labels)}
        sets = {
            name: DataSplits(train=s.subset(range(args.images)), val=s.subset(range(args.images, count)), test=None,
                             classes=[str(c) for c in range(NUM_CLASSES)], image_size=args.image_size)
            for name, s in every.items()
        }  # fmt: skip
        variants = ["in memory", "on disk"] + (["on disk, cold"] if args.cold else [])
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"device: {name}; torch {torch.__version__}")
        print(f"{args.model} at {args.image_size} px, batch {args.batch_size}; {args.images} training images ({args.images * images[0].numel() / 2**20:.0f} MiB decoded);"
              f" {args.steps} steps a run, the first {args.warmup} not timed; {args.repeats} runs each, alternating\n")
        images_per_second(sets["in memory"], argparse.Namespace(**{**vars(args), "steps": 3, "warmup": 1}), device)  # not kept: the process's first kernels and imports
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                if variant.endswith("cold"):
                    evict(store)
                rates[variant].append(images_per_second(sets[variant.split(",")[0]], args, device))
        memory = statistics.median(rates["in memory"])
        print(f"{'data':<16}{'img/s':>9}{'vs memory':>11}   runs")
        for variant in variants:
            rate = statistics.median(rates[variant])
            print(f"{variant:<16}{rate:>9.0f}{rate / memory:>10.2f}x   {' '.join(f'{r:.0f}' for r in rates[variant])}")
        store.close()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
