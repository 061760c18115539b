"""The load scenarios of ``serve_fuzz.py``, against a live server at a 127.0.0.1 URL:

* **overload**: 300 clients post an image each, back to back, ignoring ``Retry-After``, for
  ``seconds``. Every attempt must get an HTTP answer: a 200, or a JSON 503 with
  ``Retry-After`` from the queue (never a reset connection or a plain-text 503).
* **slowloris**: 64 connections held open for ``seconds``, half silent and half sending a
  header one byte a second, each reopened as soon as the server closes it, while a normal
  client sends one request at a time. Its every request must be answered within 1 s.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import select
import socket
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

OVERLOAD_CLIENTS = 300
IDLE_CONNECTIONS = 64
NORMAL_CLIENT_LIMIT_S = 1.0


@dataclass
class LoadResult:
    scenario: str
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # "200", "503 busy" (JSON, Retry-After), "other <status>", "no answer"
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds, by status
    closed_idle: int = 0  # slowloris: idle connections the server closed
    idle_lifetimes: list[float] = field(default_factory=list)  # slowloris: how long each was held before its closing
    no_answer_errors: Counter = field(default_factory=Counter)  # what the client saw instead of an answer

    def record(self, kind: str, seconds: float) -> None:
        self.statuses[kind] += 1
        self.latencies.setdefault(kind, []).append(seconds)

    def p99(self, kind: str) -> float:
        values = sorted(self.latencies.get(kind, [0.0]))
        return values[min(len(values) - 1, int(0.99 * len(values)))]

    @property
    def failures(self) -> list[str]:
        problems = []
        if self.statuses["no answer"]:
            problems.append(f"{self.statuses['no answer']} attempts got no HTTP answer")
        if any(kind.startswith("other") for kind in self.statuses):
            problems.append(f"answers other than 200 and JSON 503 + Retry-After: {dict(self.statuses)}")
        answered = self.latencies.get("200", [])
        if self.scenario == "slowloris" and (len(answered) != sum(self.statuses.values()) or not answered or max(answered) >= NORMAL_CLIENT_LIMIT_S):
            problems.append(f"the normal client was not always answered within {NORMAL_CLIENT_LIMIT_S:g} s")
        return problems


def digit_png() -> bytes:
    """A 32x32 noise image, as a client would send a photo."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(digit_png()).decode()]}]}).encode()


def classify(status: int, headers, body: bytes) -> str:
    if status == 200:
        return "200"
    if status == 503 and "retry-after" in headers and headers.get("content-type") == "application/json" and "error" in json.loads(body):
        return "503 busy"
    return f"other {status}"


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request and its answer on a kept-alive connection; a raw client costs far less CPU
    than httpx, so that 300 of them measure the server rather than themselves."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:] if line)}
    return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))


def overload(url: str, name: str, seconds: float, clients: int = OVERLOAD_CLIENTS) -> LoadResult:
    """``clients`` clients posting back to back for ``seconds``; every attempt's answer, timed."""
    result = LoadResult("overload", seconds)
    parts = urlsplit(url)
    request = request_bytes(parts.hostname, parts.port, f"/v2/models/{name}/infer", infer_body())

    async def client(deadline: float) -> None:
        writer = None
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                status, headers, body = await exchange(reader, writer, request)
                kind = classify(status, headers, body)
                if headers.get("connection") == "close":
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                kind = "no answer"
                result.no_answer_errors[type(exc).__name__] += 1
                if writer is not None:
                    writer.close()
                writer = None
            result.record(kind, time.monotonic() - started)
        if writer is not None:
            writer.close()

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(deadline) for _ in range(clients)))

    asyncio.run(main())
    return result


class IdleConnections:
    """``count`` sockets held open: half silent, half sending a header a byte a second, each
    reopened as the same kind when the server closes it."""

    def __init__(self, host: str, port: int, count: int):
        self.address, self.count = (host, port), count
        self.sockets: dict[socket.socket, tuple[float, bool]] = {}  # socket -> (when opened, trickles)
        self.closed: list[float] = []  # how long each closed one was held

    def _open(self, trickles: bool) -> None:
        s = socket.create_connection(self.address)
        if trickles:
            s.sendall(b"POST /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.sockets[s] = (time.monotonic(), trickles)

    def hold(self, until: float) -> None:
        for i in range(self.count):
            self._open(trickles=bool(i % 2))
        next_byte = time.monotonic() + 1
        while time.monotonic() < until:
            readable, _, _ = select.select(list(self.sockets), [], [], 0.1)
            for s in readable:
                if self._closed_by_server(s):
                    opened, trickles = self.sockets.pop(s)
                    self.closed.append(time.monotonic() - opened)
                    s.close()
                    self._open(trickles)
            if time.monotonic() >= next_byte:
                next_byte += 1
                for s, (_, trickles) in list(self.sockets.items()):
                    if trickles:
                        try:
                            s.sendall(b"X")
                        except OSError:
                            pass  # closed by the server: found by select next time round
        for s in self.sockets:
            s.close()

    @staticmethod
    def _closed_by_server(s: socket.socket) -> bool:
        try:
            return s.recv(4096) == b""
        except OSError:
            return True


def slowloris(url: str, name: str, seconds: float, count: int = IDLE_CONNECTIONS) -> LoadResult:
    """``count`` idle connections held for ``seconds`` while a normal client sends request after request."""
    result = LoadResult("slowloris", seconds)
    parts = urlsplit(url)
    idle = IdleConnections(parts.hostname, parts.port, count)
    until = time.monotonic() + seconds
    holder = threading.Thread(target=idle.hold, args=(until,), daemon=True)
    holder.start()
    time.sleep(0.5)  # the idle connections are open before the normal client starts
    body, infer = infer_body(), f"{url}/v2/models/{name}/infer"
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                reply = http.post(infer, content=body, headers={"content-type": "application/json"})
                kind = classify(reply.status_code, reply.headers, reply.content)
            except httpx.HTTPError as exc:
                kind = "no answer"
                result.no_answer_errors[type(exc).__name__] += 1
            result.record(kind, time.monotonic() - started)
            time.sleep(0.1)
    holder.join(10)
    result.closed_idle, result.idle_lifetimes = len(idle.closed), idle.closed
    return result


def report(result: LoadResult, print_=print) -> None:
    s = result.statuses
    ok = s["200"]
    line = f"{result.scenario}: {sum(s.values())} attempts in {result.seconds:.0f} s: 200: {ok} ({ok / result.seconds:.1f}/s, p99 {result.p99('200'):.3f} s)"
    line += f", 503 busy: {s['503 busy']} (p99 {result.p99('503 busy'):.3f} s), no answer: {s['no answer']}"
    others = {k: v for k, v in s.items() if k.startswith("other")}
    print_(line + (f", other: {others}" if others else "") + (f" ({dict(result.no_answer_errors)})" if result.no_answer_errors else ""))
    if result.scenario == "slowloris":
        held = f", held {statistics.mean(result.idle_lifetimes):.1f} s on average" if result.idle_lifetimes else ""
        print_(f"  normal client: slowest answer {max(result.latencies.get('200', [0.0])):.3f} s; idle connections closed by the server: {result.closed_idle}{held}")
    print_(f"  check: {'; '.join(result.failures) if result.failures else 'ok'}")
