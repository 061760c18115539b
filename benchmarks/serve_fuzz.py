"""Fuzz a live ``autoft serve``: no request may get a 5xx, kill it, or leave its memory grown.

The server runs as users run it (the ``autoft serve`` command, a subprocess on 127.0.0.1)
under an address-space cap. Three kinds of requests are sent, in this order:

* schemathesis cases generated from the server's own OpenAPI document, valid and invalid;
* hypothesis-generated KServe v2 bodies aimed at what broke before: NaN, ``1e400`` and
  ``1e38`` pixels, deeply nested arrays, ``"parameters": "x"``, wrong shapes and types,
  random bytes as images, bodies that are not JSON at all;
* memory attacks: eight 13000x13000 PNG decompression bombs (about 20 KB each) at once, the
  same bomb through ``/predict``, 300,000 1x1 PNGs in one 31 MB request, and 20,000 in 2 MB.

After every request the server must still answer ``/v2/health/live``. Printed: requests
tried, responses by status class, the server's idle and largest RSS, its RSS after the
memory attacks, and whether it stayed live. Aim: 0 responses 5xx, live throughout, RSS
after the attacks within 1.5x of idle.

Two load scenarios follow (``serve_load.py``), each against a fresh server with the default
limits: 300 concurrent clients, and 64 idle connections beside a normal client. Printed:
200, 503 and no-answer counts with p99 latencies. Aim: 0 no-answers, and the normal client
answered within 1 s under the slowloris.

    python benchmarks/serve_fuzz.py [--model EXPORT_DIR] [--examples 300] [--seconds 120] [--serve-args "..."]
                                    [--scenarios fuzz,overload,slowloris] [--load-seconds 20]

Without ``--model`` a test_resnet is trained briefly on scikit-learn's digits and exported.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import resource
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from autoft.deploy.inference import PREPROCESS_FILE, find_model
from autoft.core.io import read_json
from serve_load import LoadResult, overload, slowloris
from serve_load import report as report_load

MEMORY_HEADROOM = 3 * 2**30  # address space the server may add to what it holds when idle
BOMB_SIDE = 13_000


# ---------------------------------------------------------------------------
# The server under test


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    name: str

    def rss_mib(self) -> tuple[float, float]:
        """(resident now, resident at its peak) of the server process, in MiB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def live(self) -> bool:
        try:
            return self.process.poll() is None and httpx.get(f"{self.url}/v2/health/live", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model: Path, *args: str) -> Iterator[LiveServer]:
    """``autoft serve MODEL ARGS`` on a free port, until the block ends."""
    port = free_port()
    autoft_cli = str(Path(sys.executable).with_name("autoft"))
    command = [autoft_cli, "serve", str(model), "--port", str(port), "--device", "cpu", *args]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server logging more than a pipe holds would block on it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"autoft serve exited: {log.read()[-2000:]}")
            try:
                httpx.get(f"{url}/v2/health/ready", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError("autoft serve did not start in 120 s")
        yield LiveServer(process, url, read_json(find_model(model).parent / PREPROCESS_FILE)["name"])
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def cap_memory(server: LiveServer, headroom: int = MEMORY_HEADROOM) -> int:
    """Hold the server's address space to what it has now plus ``headroom``: an attack that got
    through to the decoder fails there instead of taking the machine's memory."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines() if ":" in line)
    limit = int(fields["VmSize"].split()[0]) * 1024 + headroom
    resource.prlimit(server.process.pid, resource.RLIMIT_AS, (limit, limit))
    return limit


# ---------------------------------------------------------------------------
# Tallying answers


@dataclass
class Tally:
    tried: int = 0
    classes: Counter = field(default_factory=Counter)  # "2xx", "4xx", "503 busy", "5xx", "no answer"
    server_errors: list[str] = field(default_factory=list)  # what got a 5xx or no answer
    dead_after: str | None = None

    def record(self, status: int | None, headers: Any, what: str, server: LiveServer) -> None:
        """Count one answer; a 503 with Retry-After is load shed as designed, not a failure."""
        self.tried += 1
        if status is None:
            kind = "no answer"
        elif status == 503 and "retry-after" in headers:
            kind = "503 busy"
        else:
            kind = f"{status // 100}xx"
        self.classes[kind] += 1
        if kind in ("5xx", "no answer"):
            self.server_errors.append(f"{kind}: {what[:300]}")
        if self.dead_after is None and not server.live():
            self.dead_after = what[:300]


def post(server: LiveServer, path: str, tally: Tally, what: str, **kwargs: Any) -> httpx.Response | None:
    try:
        reply = httpx.post(f"{server.url}{path}", timeout=120, **kwargs)
    except httpx.HTTPError as exc:
        tally.record(None, {}, f"{what} ({type(exc).__name__})", server)
        return None
    tally.record(reply.status_code, reply.headers, what, server)
    return reply


# ---------------------------------------------------------------------------
# Generated requests


def fuzz_schema(server: LiveServer, tally: Tally, examples: int, deadline: float) -> None:
    """schemathesis: valid and invalid requests for every operation in the OpenAPI document."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    strategies = []
    for result in schema.get_all_operations():
        operation = result.ok()
        fixed = {"name": server.name} if "{name}" in operation.path else None
        strategies += [operation.as_strategy(mode, path_parameters=fixed) for mode in GenerationMode]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def send(case) -> None:
        if time.monotonic() > deadline:
            return
        what = f"{case.method} {case.formatted_path} {case.body!r}"
        try:
            response = case.call(base_url=server.url, timeout=120)
        except Exception as exc:  # no answer at all: the connection was dropped
            tally.record(None, {}, f"{what} ({type(exc).__name__})", server)
            return
        tally.record(response.status_code, response.headers, what, server)

    send()


def kserve_bodies():
    """Hypothesis strategy for raw KServe v2 infer bodies, valid and hostile."""
    from hypothesis import strategies as st

    numbers = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1e38, -1e38, 1e300, 0.0, 1.0, 0.5]),
        st.integers(min_value=-(10**30), max_value=10**30),
    )
    scalars = st.one_of(numbers, st.booleans(), st.text(max_size=8), st.none())
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=12)
    pixels = st.tuples(st.integers(1, 3), numbers).map(lambda t: {"name": "input", "datatype": "FP32", "shape": [t[0], 3, 32, 32], "data": [t[1]] * (t[0] * 3 * 32 * 32)})
    images = st.lists(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=12), min_size=1, max_size=4).map(
        lambda data: {"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}
    )
    loose = st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["input", "image", "x"]) | values,
            "datatype": st.sampled_from(["FP32", "BYTES", "INT64"]) | values,
            "shape": st.lists(st.integers(-(2**70), 2**70), max_size=5) | values,
            "data": values,
            "parameters": values,
        },
    )
    outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "probabilities", "x"]) | values}, optional={"parameters": values}), max_size=3)
    body = st.fixed_dictionaries(
        {"inputs": st.lists(pixels | images | loose, min_size=0, max_size=2) | values},
        optional={"id": values, "parameters": values, "outputs": outputs | values},
    )
    nested = st.integers(1, 100_000).map(lambda depth: ("[" * depth + "1" + "]" * depth).encode())
    encoded = st.one_of(body, values).map(lambda v: json.dumps(v, allow_nan=True).encode())
    return st.one_of(encoded, nested.map(lambda n: b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + n + b"}]}"), nested, st.binary(max_size=256))


def fuzz_kserve(server: LiveServer, tally: Tally, examples: int, deadline: float) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=kserve_bodies())
    def send(body: bytes) -> None:
        if time.monotonic() <= deadline:
            post(server, f"/v2/models/{server.name}/infer", tally, body.decode("utf-8", "replace"), content=body, headers={"content-type": "application/json"})

    send()


# ---------------------------------------------------------------------------
# Memory attacks


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` zeros: about 20 KB that Pillow would decode to gigabytes."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed row
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def images_body(encoded: list[str]) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}]}).encode()


def attack_memory(server: LiveServer, tally: Tally) -> dict[str, list[int | None]]:
    """Decompression bombs, eight at once, and requests of many tiny images; the statuses."""
    infer = f"/v2/models/{server.name}/infer"
    bomb = bomb_png()
    bomb_body = images_body([base64.b64encode(bomb).decode()])

    def status(reply: httpx.Response | None) -> int | None:
        return None if reply is None else reply.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = {"8 bombs at once": [status(r) for r in pool.map(lambda i: post(server, infer, tally, f"bomb {i}", content=bomb_body), range(8))]}
    statuses["bomb upload to /predict"] = [status(post(server, "/predict", tally, "bomb upload", files={"file": ("bomb.png", bomb, "image/png")}))]
    tiny = tiny_png()
    for count in (300_000, 20_000):
        statuses[f"{count:,} tiny images"] = [status(post(server, infer, tally, f"{count} tiny images", content=images_body([tiny] * count)))]
    return statuses


# ---------------------------------------------------------------------------


@dataclass
class Summary:
    tally: Tally
    idle_rss_mib: float
    peak_rss_mib: float
    after_attacks_rss_mib: float
    live: bool
    seconds: float
    attacks: dict[str, list[int | None]]  # statuses of the memory attacks


def run(model: Path, *, examples: int = 300, seconds: float = 120.0, serve_args: tuple[str, ...] = ()) -> Summary:
    """Everything above against one ``autoft serve``; ``examples`` per generator, ``seconds`` for all."""
    started = time.monotonic()
    deadline = started + seconds
    tally = Tally()
    with live_server(model, *serve_args) as server:
        warm = images_body([tiny_png()])
        post(server, f"/v2/models/{server.name}/infer", tally, "warm-up", content=warm)  # sessions and arenas allocated
        idle, _ = server.rss_mib()
        cap_memory(server)
        attacks = attack_memory(server, tally)
        after, _ = server.rss_mib()
        fuzz_kserve(server, tally, examples, deadline)
        fuzz_schema(server, tally, examples, deadline)
        _, peak = server.rss_mib()
        live = server.live()
    return Summary(tally, idle, peak, after, live and tally.dead_after is None, time.monotonic() - started, attacks)


def report(summary: Summary, print_: Callable[[str], None] = print) -> None:
    t = summary.tally
    classes = ", ".join(f"{k}: {t.classes[k]}" for k in ("2xx", "4xx", "503 busy", "5xx", "no answer") if t.classes[k]) or "none"
    print_(f"requests tried: {t.tried} in {summary.seconds:.0f} s ({classes})")
    print_(f"server RSS: idle {summary.idle_rss_mib:.0f} MiB, after the memory attacks {summary.after_attacks_rss_mib:.0f} MiB "
           f"({summary.after_attacks_rss_mib / summary.idle_rss_mib:.2f}x idle), largest {summary.peak_rss_mib:.0f} MiB "
           f"({summary.peak_rss_mib / summary.idle_rss_mib:.2f}x idle)")
    for attack, statuses in summary.attacks.items():
        print_(f"{attack}: {', '.join(map(str, statuses))}")
    print_(f"server live after every request: {'yes' if summary.live else 'no, dead after ' + str(t.dead_after)}")
    for error in t.server_errors[:10]:
        print_(f"  {error}")


def run_load(model: Path, scenarios: list[str], seconds: float, serve_args: tuple[str, ...] = ()) -> list[LoadResult]:
    """Each load scenario against its own ``autoft serve``, so that one's load does not linger into the next."""
    results = []
    for scenario in scenarios:
        with live_server(model, *serve_args) as server:
            results.append({"overload": overload, "slowloris": slowloris}[scenario](server.url, server.name, seconds))
    return results


def trained_export(work: Path) -> Path:
    import autoft

    run_dir = work / "digits"
    autoft.train("test_resnet", "sample:digits", run_dir, epochs=1, image_size=32, device="cpu")
    return autoft.export(run_dir).out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an export folder or model.onnx; default: a test_resnet trained on digits")
    parser.add_argument("--examples", type=int, default=300, help="cases per generator (schemathesis, KServe bodies)")
    parser.add_argument("--seconds", type=float, default=120.0, help="time for the generated cases")
    parser.add_argument("--serve-args", default="", help='more autoft serve flags, e.g. "--max-megapixels 1000" to see the bombs without the pixel limit')
    parser.add_argument("--scenarios", default="fuzz,overload,slowloris", help="which to run, comma-separated")
    parser.add_argument("--load-seconds", type=float, default=20.0, help="time for each load scenario")
    args = parser.parse_args()
    scenarios, serve_args = args.scenarios.split(","), tuple(shlex.split(args.serve_args))
    with tempfile.TemporaryDirectory() as work:
        model = args.model or trained_export(Path(work))
        if "fuzz" in scenarios:
            report(run(model, examples=args.examples, seconds=args.seconds, serve_args=serve_args))
        loads = run_load(model, [s for s in scenarios if s != "fuzz"], args.load_seconds, serve_args)
    for result in loads:
        report_load(result)
    sys.exit(1 if any(result.failures for result in loads) else 0)


if __name__ == "__main__":
    main()
