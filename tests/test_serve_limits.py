"""The server's limits under load, idle connections and a broken model, against real sockets:
overload shed by the queue as JSON 503s with Retry-After, idle connections closed, a model
with non-finite outputs refused or reported not ready."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from autoft.deploy.inference import OnnxClassifier
from autoft.deploy.serving import Batcher, ServeConfig, create_app, uvicorn_options

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def classifier(digits_onnx):
    return OnnxClassifier.load(digits_onnx, device="cpu")


def _valid_body(digits):
    return {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": digits.val.images[:1].float().div(255).numpy().reshape(-1).tolist()}]}


def _images_body(files: list[bytes]) -> dict:
    import base64

    return {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES", "data": [base64.b64encode(f).decode() for f in files]}]}


def _png(digits, index: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(digits.val.images[index].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _served(live_app, classifier, config: ServeConfig) -> str:
    """``classifier`` served as ``autoft serve`` serves it, with ``config``; its address."""
    app = create_app(classifier, config)
    return live_app(app, **uvicorn_options(config))


# ---------------------------------------------------------------------------
# The queue and the decoders are bounded


def _slow(classifier: OnnxClassifier, seconds: float) -> OnnxClassifier:
    slow = replace(classifier)

    def logits(pixels):
        time.sleep(seconds)
        return classifier.logits(pixels)

    slow.logits = logits
    return slow


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_is_answered_503_with_retry_after(classifier, live_app, digits):
    config = ServeConfig(max_batch=1, max_delay_ms=0, max_images=1, max_queue=2)
    app = create_app(_slow(classifier, 1.5), config)
    url = f"http://{live_app(app, **uvicorn_options(config))}{INFER}"
    batcher = app.state.batcher
    body = _valid_body(digits)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url, json=body, timeout=60)
        _wait_for(lambda: batcher.admitted == 1)
        waiting = pool.submit(httpx.post, url, json=body, timeout=60)
        _wait_for(lambda: batcher.admitted == 2)
        shed = httpx.post(url, json=body, timeout=60)
        assert shed.status_code == 503, shed.text
        assert shed.headers["retry-after"] == "1"
        assert "--max-queue 2" in shed.json()["error"]
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert batcher.admitted == 0
    assert httpx.post(url, json=body, timeout=60).status_code == 200  # served again once drained


def test_images_are_decoded_at_most_decode_workers_at_once(classifier, live_app, digits, monkeypatch):
    from autoft.deploy.serving import parsing

    decode, lock = parsing.decode, threading.Lock()
    active, peak = [0], [0]

    def tracked(source, size):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return decode(source, size)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(parsing, "decode", tracked)
    url = f"http://{live_app(create_app(classifier, ServeConfig(decode_workers=2)))}{INFER}"
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: httpx.post(url, json=_images_body([_png(digits, i)]), timeout=60), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert peak[0] == 2


def test_the_batcher_admits_rows_up_to_its_queue():
    from autoft.deploy.serving import Overloaded

    batcher = Batcher(lambda batch: batch, max_queue=3)
    with batcher.admit(2):
        with pytest.raises(Overloaded, match="--max-queue 3"):
            with batcher.admit(2):
                pass
        with batcher.admit(1):
            assert batcher.admitted == 3
    assert batcher.admitted == 0


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_images": 16, "max_queue": 8}, "--max-queue (8) must be at least --max-images (16)"),
        ({"decode_workers": 0}, "--decode-workers must be at least 1"),
        ({"max_images": 0}, "--max-images must be at least 1"),
        ({"max_batch": 0}, "--max-batch must be at least 1"),
    ],
)
def test_unusable_limits_are_refused(limits, message):
    from autoft.errors import AutoftError

    with pytest.raises(AutoftError) as caught:
        ServeConfig(**limits).check()
    assert message in str(caught.value)


def test_serve_flags_set_the_limits_and_the_name(monkeypatch, digits_onnx):
    from typer.testing import CliRunner

    from autoft.cli import make_app

    calls = []
    monkeypatch.setattr("autoft.deploy.serving.serve", lambda model, config, **options: calls.append((model, config, options)))
    flags = ["--max-images", "8", "--max-megapixels", "2.5", "--decode-workers", "3", "--max-queue", "99", "--max-connections", "7", "--max-body-mb", "1"]
    flags += ["--header-timeout", "2.5", "--keep-alive", "3"]
    result = CliRunner().invoke(make_app(), ["serve", str(digits_onnx), *flags, "--max-batch", "4", "--name", "photos"])
    assert result.exit_code == 0, result.output
    (model, config, options), = calls
    assert config == ServeConfig(max_batch=4, max_body_bytes=2**20, max_images=8, max_image_pixels=2_500_000, decode_workers=3, max_queue=99, max_connections=7, header_timeout_s=2.5, keep_alive_s=3)
    assert options["name"] == "photos" and model == str(digits_onnx)
    assert CliRunner().invoke(make_app(), ["serve", str(digits_onnx)]).exit_code == 0
    assert calls[-1][1] == ServeConfig()  # the flags' defaults are the library's


def test_serve_refuses_limits_that_cannot_work_in_one_line(digits_onnx):
    from typer.testing import CliRunner

    from autoft.cli import make_app

    result = CliRunner().invoke(make_app(), ["serve", str(digits_onnx), "--max-images", "8", "--max-queue", "4"])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.strip()] == ["error: --max-queue (4) must be at least --max-images (8), or no full request could be admitted"]




# ---------------------------------------------------------------------------
# Overload: shed by the app's queue, whatever the number of connections

CLIENTS = 100  # more than the 64 connections uvicorn's limit_concurrency used to refuse beyond
MODEL_SECONDS = 4.0  # each batch: the shed requests must be answered before the admitted ones


def test_overload_beyond_the_queue_is_a_quick_json_503_never_a_dropped_connection(classifier, live_app, digits):
    config = ServeConfig(max_batch=2, max_delay_ms=50, max_images=1, max_queue=2)  # the default --max-connections
    url = f"http://{_served(live_app, _slow(classifier, MODEL_SECONDS), config)}{INFER}"
    body = json.dumps(_valid_body(digits)).encode()

    async def one(client: httpx.AsyncClient):
        started = time.monotonic()
        try:
            reply = await client.post(url, content=body, headers={"content-type": "application/json"})
        except httpx.TransportError as exc:  # no HTTP answer at all
            return type(exc).__name__, None, time.monotonic() - started
        return reply.status_code, reply, time.monotonic() - started

    async def burst():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS), timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(CLIENTS)))

    results = asyncio.run(burst())
    assert Counter(status for status, _, _ in results) == {200: 2, 503: CLIENTS - 2}
    shed = [(reply, seconds) for status, reply, seconds in results if status == 503]
    for reply, _ in shed:
        assert reply.headers["retry-after"] == "1" and reply.headers["content-type"] == "application/json"
        assert "--max-queue 2" in reply.json()["error"]
    # Answered while the two admitted requests were still running, not queued behind them.
    assert max(seconds for _, seconds in shed) < MODEL_SECONDS <= min(seconds for status, _, seconds in results if status == 200)


def test_over_max_connections_the_longest_idle_connection_makes_room(classifier, live_app):
    host, port = _served(live_app, classifier, ServeConfig(max_connections=4, header_timeout_s=60)).split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(4)]
    try:
        time.sleep(0.3)  # accepted by the server
        assert httpx.get(f"http://{host}:{port}/v2/health/ready", timeout=5).status_code == 200
        assert _closed_by_server(idle[0], within=2.0)  # the first opened: idle the longest
        assert not _closed_by_server(idle[3], within=0.2)
    finally:
        for s in idle:
            s.close()


def test_over_max_connections_with_every_one_busy_a_request_gets_a_json_503(classifier, live_app, digits):
    config = ServeConfig(max_batch=1, max_delay_ms=0, max_images=1, max_queue=4, max_connections=2)
    url = f"http://{_served(live_app, _slow(classifier, 2.0), config)}{INFER}"
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(httpx.post, url, json=_valid_body(digits), timeout=30) for _ in range(2)]
        time.sleep(0.5)  # both in flight
        refused = httpx.post(url, json=_valid_body(digits), timeout=30)
        assert [f.result().status_code for f in busy] == [200, 200]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-connections" in refused.json()["error"]


# ---------------------------------------------------------------------------
# Idle connections: closed after the header timeout, never in the way of a client


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds."""
    readable, _, _ = select.select([sock], [], [], within)
    if not readable:
        return False
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_are_closed_after_the_header_timeout(classifier, live_app, digits):
    address = _served(live_app, classifier, ServeConfig(header_timeout_s=1.0))
    host, port = address.split(":")
    opened = time.monotonic()
    silent = [socket.create_connection((host, int(port))) for _ in range(32)]
    trickling = [socket.create_connection((host, int(port))) for _ in range(32)]
    for s in trickling:
        s.sendall(b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    try:
        reply = httpx.post(f"http://{address}{INFER}", json=_valid_body(digits), timeout=5)
        assert reply.status_code == 200 and reply.elapsed.total_seconds() < 1.0  # answered meanwhile
        open_ = {s: None for s in silent + trickling}
        while any(closed is None for closed in open_.values()) and time.monotonic() - opened < 5:
            for s in trickling:
                if open_[s] is None:
                    try:
                        s.sendall(b"X")  # a byte of a header that never ends: does not reset the timeout
                    except OSError:
                        pass
            readable, _, _ = select.select([s for s, closed in open_.items() if closed is None], [], [], 0.1)
            for s in readable:
                if _closed_by_server(s, within=0):
                    open_[s] = time.monotonic() - opened
        closed_after = list(open_.values())
        assert None not in closed_after, f"{closed_after.count(None)} of 64 idle connections still open after 5 s"
        assert 0.9 <= min(closed_after) and max(closed_after) < 3.0
    finally:
        for s in silent + trickling:
            s.close()


# ---------------------------------------------------------------------------
# A model whose outputs are not finite


def _strict_json(text: str):
    """Parse as JSON proper: NaN and Infinity are not JSON, though Python's json reads them."""

    def refuse(constant):
        raise ValueError(f"{constant} in the answer")

    return json.loads(text, parse_constant=refuse)


def test_a_model_with_nan_weights_is_never_ready_and_never_answers_nan(nan_onnx, live_app, digits):
    import tritonclient.http as triton

    address = _served(live_app, OnnxClassifier.load(nan_onnx, device="cpu"), ServeConfig())
    assert triton.InferenceServerClient(address).is_server_live()
    assert not triton.InferenceServerClient(address).is_server_ready()
    for path in ("/v2/health/ready", "/v2/models/digits/ready"):
        reply = httpx.get(f"http://{address}{path}")
        assert reply.status_code == 400 and _strict_json(reply.text)["ready"] is False
        assert "not finite" in reply.json()["error"] and "probe batch" in reply.json()["error"]
    for reply in (httpx.post(f"http://{address}{INFER}", json=_valid_body(digits)), httpx.post(f"http://{address}/predict", content=_png(digits, 0))):
        assert reply.status_code == 503, reply.text
        assert _strict_json(reply.text)["error"].startswith("the model is not ready:")


def test_non_finite_outputs_on_a_request_are_a_json_500_and_ready_turns_false(classifier, live_app, digits):
    broken, calls = replace(classifier), []

    def logits(pixels):  # sound for the startup probe, NaN afterwards
        calls.append(len(pixels))
        return classifier.logits(pixels) * (1.0 if len(calls) == 1 else np.nan)

    broken.logits = logits
    address = _served(live_app, broken, ServeConfig())
    assert httpx.get(f"http://{address}/v2/health/ready").json() == {"ready": True}
    reply = httpx.post(f"http://{address}{INFER}", json=_valid_body(digits))
    assert reply.status_code == 500 and "not finite" in _strict_json(reply.text)["error"]
    ready = httpx.get(f"http://{address}/v2/health/ready")
    assert ready.status_code == 400 and ready.json()["ready"] is False


def test_serve_refuses_a_model_with_nan_weights_in_one_line(nan_onnx):
    autoft_cli = str(Path(sys.executable).with_name("autoft"))
    run = subprocess.run([autoft_cli, "serve", str(nan_onnx), "--port", "0", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not finite" in lines[0] and "Traceback" not in run.stderr
