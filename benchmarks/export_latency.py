"""onnxruntime fp32 and int8 against PyTorch eager: latency at batch 1 and 32, int8 accuracy change.

A realistic network (resnet18 by default, random init) is trained briefly on the digits
sample at 64px, exported through ``autoft.deploy.exporting`` (fp32; plain int8, MinMax-calibrated on
training images whatever it loses; and tuned int8, held to ``--max-accuracy-drop`` by other
calibration methods and fp32 nodes), and each runtime is timed in this same run on the same
CPU threads. Ratios are speed-ups over PyTorch eager. Aims on a CPU: fp32 >= 1.3x at batch
1; int8 >= 2x with at most 1 point of validation accuracy lost.

    python benchmarks/export_latency.py [--backbone resnet18] [--image-size 64] [--epochs 1] [--max-accuracy-drop 0.01]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import autoft
from autoft.deploy.inference import create_session
from autoft.model.checkpoints import load_checkpoint


def median_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call, each runtime timed in its own block.

    Not interleaved: onnxruntime's worker threads spin for a while after each run, and a
    PyTorch call made during that spin would be measured against a busy CPU.
    """
    result = {}
    for name, call in calls.items():
        time.sleep(0.5)  # let the previous runtime's threads go idle
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        result[name] = 1000 * statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01, help="the tuned int8 model's bound")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        run = Path(work) / "run"
        print(f"training {args.backbone} on sample:digits at {args.image_size}px for {args.epochs} epoch(s)...", flush=True)
        trained = autoft.train(args.backbone, "sample:digits", run, epochs=args.epochs, lr=3e-3, freeze_depth=0, image_size=args.image_size, device="cpu")
        print(f"  val accuracy (PyTorch) {trained.metrics['val_accuracy']:.4f}")
        fp32 = autoft.export(run, Path(work) / "fp32")
        int8 = autoft.export(run, Path(work) / "int8", precision="int8", max_accuracy_drop=1.0)  # plain: measure, do not gate
        exports = {"onnxruntime int8": int8}
        try:
            exports["int8 tuned"] = autoft.export(run, Path(work) / "int8-tuned", precision="int8", max_accuracy_drop=args.max_accuracy_drop)
        except autoft.AutoftError as exc:
            print(f"  tuned int8: {exc}")
        net = load_checkpoint(run).network()
        sessions = {"onnxruntime fp32": create_session(fp32.model, "cpu"), **{name: create_session(e.model, "cpu") for name, e in exports.items()}}

        print(f"\nthreads: torch {torch.get_num_threads()}, onnxruntime default; median of {args.repeats} runs")
        print(f"{'runtime':<20}{'batch':>6}{'ms':>10}{'vs eager':>10}")
        for batch in (1, 32):
            x = torch.rand(batch, 3, args.image_size, args.image_size)
            feed = {"input": x.numpy()}

            def eager():
                with torch.inference_mode():
                    net(x)

            calls = {"PyTorch eager": eager, **{name: (lambda s=session: s.run(["logits"], feed)) for name, session in sessions.items()}}
            timings = median_ms(calls, args.repeats)
            baseline = timings["PyTorch eager"]
            for name, ms in timings.items():
                print(f"{name:<20}{batch:>6}{ms:>10.2f}{baseline / ms:>9.2f}x")

        print()
        for name, exported in exports.items():
            accuracy, quantization = exported.report["accuracy"], exported.report["quantization"]
            print(
                f"{name} validation accuracy on {accuracy['val_images']} images: fp32 {accuracy['val_accuracy_fp32']:.4f} -> "
                f"int8 {accuracy['val_accuracy_int8']:.4f} ({accuracy['change_points']:+.2f} points); {quantization['calibration_method']} "
                f"calibration, {len(quantization['nodes_in_fp32'])} node(s) in fp32 {quantization['nodes_in_fp32'] or ''}, {len(quantization['tries'])} tries"
            )
        checks = fp32.report["checks"]["fp32"]
        print("fp32 parity: " + ", ".join(f"batch {c['batch_size']} max |diff| {c['max_abs_diff']:.2g}" for c in checks.values()))


if __name__ == "__main__":
    main()
