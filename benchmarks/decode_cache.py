"""A second command on the same folder: wall time and peak RSS with the decoded-image cache cold and warm.

Writes ``--images`` photo-sized JPEG files (``--photo`` pixels, smooth colour fields with noise,
two classes), then runs each command twice in fresh processes against one empty
``AUTOFT_CACHE_DIR``: the first decodes every image and fills the cache, the second must read
the cache and decode nothing. Peak RSS is the child's own ``ru_maxrss`` (``os.wait4``).

* ``load``: ``autoft.data.decoding.load_data`` alone (decoding and splitting, nothing else);
* ``train``: ``autoft train test_resnet --epochs 1`` on the CPU (a real second command).

Ratios are cold over warm, measured in this run.

    python benchmarks/decode_cache.py [--images 1000] [--photo 1024x768] [--image-size 128] [--no-train]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_photos(root: Path, count: int, width: int, height: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        label = i % 2
        phase = rng.uniform(0, 2 * np.pi, 3)
        scale = rng.uniform(0.005, 0.02)
        field = np.stack([np.sin(x * scale + phase[c] + label * 2.0) + np.cos(y * scale * (1 + c)) for c in range(3)], axis=-1)
        pixels = (field * 60 + 128 + rng.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{i:05d}.jpg", quality=90)

    for label in range(2):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy and Pillow release the GIL
        list(pool.map(one, range(count)))


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command[:4])}...\n{child.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--photo", default="1024x768", help="WIDTHxHEIGHT of the JPEG files")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--no-train", action="store_true", help="only time loading")
    args = parser.parse_args()
    width, height = map(int, args.photo.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="autoft-decode-cache-") as work:
        root = Path(work) / "photos"
        started = time.perf_counter()
        write_photos(root, args.images, width, height)
        on_disk = sum(f.stat().st_size for f in root.rglob("*.jpg"))
        decoded = args.images * 3 * args.image_size**2
        print(f"{args.images} JPEG photos of {width}x{height} ({on_disk / 2**20:.0f} MiB, written in {time.perf_counter() - started:.0f} s); "
              f"decoded at {args.image_size}px: {decoded / 2**20:.0f} MiB; {os.cpu_count()} CPUs")  # fmt: skip
        commands = {
            "load": [sys.executable, "-c", f"from autoft.data.decoding import load_data; load_data({str(root)!r}, image_size={args.image_size})"],
            "train": [sys.executable, "-c", "from autoft.cli import main; main()", "train", "--backbone", "test_resnet", "--data", str(root),
                      "--out", str(Path(work) / "run"), "--epochs", "1", "--image-size", str(args.image_size), "--device", "cpu"],  # fmt: skip
        }
        if args.no_train:
            del commands["train"]
        print(f"{'command':<8}{'cache':<7}{'seconds':>9}{'peak RSS MiB':>14}")
        for name, command in commands.items():
            env = {**os.environ, "AUTOFT_CACHE_DIR": str(Path(work) / f"cache-{name}"), "PYTHONWARNINGS": "ignore"}
            cold = run_measured(command, env)
            warm = run_measured(command, env)
            for label, (seconds, rss) in (("cold", cold), ("warm", warm)):
                print(f"{name:<8}{label:<7}{seconds:>9.1f}{rss:>14.0f}")
            print(f"{name:<8}{'ratio':<7}{cold[0] / warm[0]:>8.2f}x{cold[1] / warm[1]:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
