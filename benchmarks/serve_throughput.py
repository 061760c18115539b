"""Served requests per second, with and without dynamic batching, under 32 concurrent clients.

A resnet18 (random init, a brief fit so that it has a checkpoint) is exported at 64px and
served twice by ``autoft serve`` in a subprocess: once with ``--max-batch 1`` (every
request its own onnxruntime call) and once with ``--max-batch 32``. Each of 32 client
threads posts one encoded PNG at a time to the KServe v2 infer endpoint, as ``tritonclient``
does with ``binary_data=False``. Aim: dynamic batching >= 2x the requests per second.

    python benchmarks/serve_throughput.py [--backbone resnet18] [--image-size 64] [--seconds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import base64
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

import autoft
from autoft.data.decoding import load_data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def measure(model: Path, name: str, bodies: list[dict], *, max_batch: int, max_delay_ms: float, clients: int, seconds: float) -> tuple[float, int]:
    port = free_port()
    autoft_cli = str(Path(sys.executable).with_name("autoft"))
    server = subprocess.Popen(
        [autoft_cli, "serve", str(model), "--port", str(port), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the server did not start")
        counts = [0] * clients
        errors = [0] * clients
        stop = threading.Event()

        def client(index: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                i = index
                while not stop.is_set():
                    reply = http.post(f"/v2/models/{name}/infer", json=bodies[i % len(bodies)])
                    if reply.status_code == 200:
                        counts[index] += 1
                    else:
                        errors[index] += 1
                    i += clients

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # warm up: sessions, connections, first batches
        start_count, started = sum(counts), time.perf_counter()
        time.sleep(seconds)
        done, elapsed = sum(counts) - start_count, time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
        return done / elapsed, sum(errors)
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    args = parser.parse_args()

    splits = load_data("sample:digits", image_size=args.image_size, seed=0)
    with tempfile.TemporaryDirectory() as work:
        run = Path(work) / "run"
        small = dataclasses.replace(splits, train=splits.train.subset(range(64)))  # throughput needs no accuracy
        autoft.train(args.backbone, small, run, epochs=1, image_size=args.image_size, device="cpu")
        exported = autoft.export(run, Path(work) / "fp32", images=splits.val)
        name = exported.report["name"]
        bodies = [
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [png(splits.val.images[i])]}]} for i in range(64)
        ]
        print(f"{args.backbone} at {args.image_size}px, {args.clients} concurrent clients, {args.seconds:g} s each, one PNG per request")
        unbatched, e1 = measure(exported.model, name, bodies, max_batch=1, max_delay_ms=0, clients=args.clients, seconds=args.seconds)
        print(f"  without dynamic batching (--max-batch 1):  {unbatched:8.1f} requests/s  ({e1} errors)", flush=True)
        batched, e2 = measure(
            exported.model, name, bodies, max_batch=32, max_delay_ms=args.max_delay_ms, clients=args.clients, seconds=args.seconds
        )
        print(f"  with dynamic batching (--max-batch 32, {args.max_delay_ms:g} ms): {batched:8.1f} requests/s  ({e2} errors)")
        print(f"  ratio: {batched / unbatched:.2f}x")


if __name__ == "__main__":
    main()
