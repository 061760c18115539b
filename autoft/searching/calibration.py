"""What the planner measures: the images' own size, the backbone's throughput at it and, from
pretrained weights, a linear probe's accuracy at each size the budget affords (:class:`SizeProbe`,
measured by :mod:`autoft.searching.sizing`).

Calibration times training batches in several short windows after a warm-up and keeps the
median window's rate: one window slowed by another process (the machine is shared, a
kernel is being selected, the garbage collector runs) moves the median little, so two
runs of one command on one machine plan the same shape.

On a CPU it also measures how many threads train fastest (:func:`fastest_threads`), rather than
take one a core: torch's OpenMP threads wait on each other at every operation, and a thread
descheduled by another process stalls them all. On a 2-core machine two threads trained resnet18
(64 px, batch 32) at 0.20 s a step against 0.38 s for one when alone, and at 0.73 s against 0.38 s
beside one busy process.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from autoft.core.text import duration

MIN_SIZE = 32  # smaller inputs leave a few pixels after a backbone's downsampling
WINDOWS = 5  # timed windows per measurement: the median of five shrugs off two bad ones
WARMUP_STEPS = 1  # allocation, kernel selection, first-touch: never timed
THREADS_TIE = 0.1  # fewer CPU threads must train this much faster to be chosen


@dataclass(frozen=True)
class Throughput:
    """Images a second on this device at one image size, measured."""

    size: int
    train: float
    evaluate: float
    threads: int = 0  # the CPU threads it was measured with (0: not chosen, a GPU)
    cpu_share: float = 1.0  # of those threads' cores, the share this process had while measured (other processes take the rest)


# ---------------------------------------------------------------------------
# The data's own size


def short_side(sample) -> int | None:
    """The shorter side of one image without decoding it (a header read for files)."""
    import numpy as np
    from PIL import Image

    try:
        if isinstance(sample, np.ndarray):
            return int(min(sample.shape[:2]))
        if isinstance(sample, Image.Image):
            return int(min(sample.size))
        with Image.open(sample) as image:
            return int(min(image.size))
    except Exception:  # unreadable: decoding reports it later
        return None


def median_short_side(samples: Sequence, limit: int = 256, seed: int = 0) -> int | None:
    chosen = list(samples) if len(samples) <= limit else random.Random(seed).sample(list(samples), limit)
    sides = sorted(s for s in map(short_side, chosen) if s)
    return sides[len(sides) // 2] if sides else None


def own_size(median_side: int, native: int) -> int:
    """The images' own size rounded *up* to a multiple of 8 (never below it: 48-px images
    train at 48, not 40 or 32), at least :data:`MIN_SIZE`, at most the backbone's native size."""
    return min(native, max(MIN_SIZE, 8 * math.ceil(median_side / 8)))


def candidate_sizes(median_side: int | None, native: int, pretrained: bool) -> list[int]:
    """The data's own size, then (pretrained weights only) larger ones up to the native size."""
    if median_side is None:
        return [native]
    base = own_size(median_side, native)
    sizes = [base]
    if pretrained:
        sizes += [s for s in (2 * base, native) if base < s <= native and s not in sizes]
    return sizes


TIE = 0.01  # probe accuracies this close are a tie, won by the larger size: fine-tuning reads pretrained features best near their scale


@dataclass(frozen=True)
class SizeProbe:
    """A linear probe's held-out accuracy on the starting weights' features, by image size,
    on ``images`` of the labelled images; or, when it was not measured, ``skipped`` says why."""

    accuracies: dict[int, float]
    images: int = 0
    seconds: float = 0.0
    skipped: str | None = None

    def choose(self, sizes: Sequence[int]) -> int | None:
        """The largest of ``sizes`` whose accuracy is within :data:`TIE` of the best; None
        when fewer than two of them were measured. A tie goes to the larger size: the probe
        reads only what the starting features already separate (1.00 at 64 and 112 px on 25-px
        faces), while fine-tuning gains from the scale they were learnt at (lite0 searched at
        the faces' own size scored 0.917 on held-out images, its probe at 112 px 0.983)."""
        measured = {s: self.accuracies[s] for s in sizes if s in self.accuracies}
        if len(measured) < 2:
            return None
        best = max(measured.values())
        return max(s for s, accuracy in measured.items() if accuracy >= best - TIE)

    def describe(self, chosen: int) -> str:
        """``112 px by a linear probe on 400 images: 0.84 at 64 px, 0.91 at 112 px (3s)``."""
        read = ", ".join(f"{self.accuracies[s]:.2f} at {s} px" for s in sorted(self.accuracies))
        tie = f"; within {TIE:g} of the best, the larger size" if self.accuracies[chosen] < max(self.accuracies.values()) else ""
        return f"{chosen} px by a linear probe of the starting weights on {self.images} images: {read} ({duration(self.seconds)}{tie})"


# ---------------------------------------------------------------------------
# Throughput


def calibrate(
    make_model: Callable[[], object], sizes: Sequence[int], batch_size: int, device, num_classes: int, seconds: float = 1.0, windows: int = WINDOWS,
    limit: float | None = None, threads: int | None = None,
) -> dict[int, Throughput]:
    """Time training steps and evaluation batches at each size: about ``1.25 * seconds`` a
    size, in ``windows`` windows each, the median window's rate kept. ``limit`` (seconds) caps
    the whole measurement, so a short budget is not spent measuring a model too slow for it.

    On a CPU, ``threads`` (at most; default: torch's current count) are first measured against
    fewer at the first size (:func:`fastest_threads`); every size is then timed with the fastest
    count, which each :class:`Throughput` records and the search then trains with, beside the
    share of the cores the process had meanwhile (CPU time over wall time, for one thread on 2
    cores: 1.00 alone, 0.67 to 0.78 beside two busy processes, 0.50 beside three), by which the
    planner prices its single-threaded work."""
    import torch

    from autoft.core.runtime import torch_threads

    until = None if limit is None else time.perf_counter() + max(limit, 0.0)

    model = make_model().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    results, count, train = {}, 0, None
    if device.type == "cpu":
        x = torch.rand(batch_size, 3, sizes[0], sizes[0])
        y = torch.randint(0, num_classes, (batch_size,))
        model.train()
        count, train = fastest_threads(lambda: _train_step(model, optimizer, x, y, device), batch_size, threads or torch.get_num_threads(), seconds, windows, until)
    with torch_threads(count):
        wall, cpu = time.perf_counter(), time.process_time()
        for size in sizes:
            results[size] = _measure(model, optimizer, size, batch_size, device, num_classes, seconds, windows, until, count, train if size == sizes[0] else None)
            if results[size].train * seconds < batch_size or (until is not None and time.perf_counter() >= until):  # slow already: larger sizes only more so
                break
        share = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9) / max(count, 1) if count else 1.0
    return {size: dataclasses.replace(rate, cpu_share=min(1.0, share)) for size, rate in results.items()}


def fastest_threads(step: Callable[[], object], batch_size: int, most: int, seconds: float, windows: int = WINDOWS, until: float | None = None) -> tuple[int, float]:
    """The count of CPU threads, of ``most``, ``most // 2``, ... 1, that runs ``step`` fastest,
    and its rate (images a second, :func:`median_rate`). Halving stops at the first count slower than the best so far: on a machine where more
    threads pay, one measurement more than needed. Ties within :data:`THREADS_TIE` go to
    the larger count."""
    import torch

    from autoft.core.runtime import torch_threads

    best, best_rate, count = most, 0.0, most
    while count >= 1:
        with torch_threads(count):
            rate = median_rate(step, batch_size, seconds, torch.device("cpu"), windows, until)
        if rate > best_rate * (1 + THREADS_TIE):
            best, best_rate = count, rate
        elif count < most:
            break
        if count == 1 or (until is not None and time.perf_counter() >= until):
            break
        count = max(1, count // 2)
    return best, best_rate


def _train_step(model, optimizer, x, y, device) -> None:
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _measure(
    model, optimizer, size: int, batch_size: int, device, num_classes: int, seconds: float, windows: int, until: float | None, threads: int, train: float | None = None,
) -> Throughput:
    """Training and evaluation rates at ``size``; ``train``, when given, was measured already."""
    import torch

    x = torch.rand(batch_size, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    if train is None:
        model.train()
        train = median_rate(lambda: _train_step(model, optimizer, x, y, device), batch_size, seconds, device, windows, until)
    model.eval()
    with torch.inference_mode():
        evaluate = median_rate(lambda: model(x), batch_size, seconds / 4, device, windows, until)
    return Throughput(size, train, evaluate, threads)


def median_rate(step: Callable[[], object], batch_size: int, seconds: float, device, windows: int = WINDOWS, until: float | None = None) -> float:
    """Images a second: the median over ``windows`` windows of about ``seconds / windows``
    each (at least one step a window), after :data:`WARMUP_STEPS` untimed steps. Past ``until``
    (a ``time.perf_counter()`` value) the windows measured so far count, or, with none yet, the
    warm-up itself: slower than a measured step, it says enough of a model too slow to train."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        step()
    sync()
    if until is not None and time.perf_counter() >= until:
        return batch_size * WARMUP_STEPS / (time.perf_counter() - warm)
    window, rates, started = seconds / windows, [], time.perf_counter()
    # Steps much slower than a window end the measurement after three windows: a median of three still drops one outlier.
    while len(rates) < windows and (len(rates) < 3 or time.perf_counter() - started < 2 * seconds) and not (rates and until is not None and time.perf_counter() >= until):
        opened, count = time.perf_counter(), 0
        while count < 1 or time.perf_counter() - opened < window:
            step()
            sync()
            count += 1
        rates.append(batch_size * count / (time.perf_counter() - opened))
    return statistics.median(rates)
