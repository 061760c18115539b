"""The KServe v2 server: tritonclient and plain HTTP clients, dynamic batching, bad requests."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from autoft.inference import OnnxClassifier
from autoft.serving import Batcher, ServeConfig, create_app

MAX_BODY = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def classifier(digits_onnx):
    return OnnxClassifier.load(digits_onnx, device="cpu")


@pytest.fixture(scope="module")
def server(classifier):
    """A live uvicorn server on 127.0.0.1, in a thread; yields (base URL, app)."""
    import uvicorn

    app = create_app(classifier, ServeConfig(max_batch=8, max_delay_ms=30, max_body_bytes=MAX_BODY))
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    yield f"127.0.0.1:{port}", app
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://{server[0]}", timeout=30) as client:
        yield client


def _png(digits, index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digits.val.images[index].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(digits, n: int) -> np.ndarray:
    return digits.val.images[:n].float().div(255).numpy()


def test_health_and_metadata_through_tritonclient(server, classifier):
    client = triton.InferenceServerClient(server[0])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_model_metadata("digits")
    assert metadata["name"] == "digits"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {"input": ("FP32", [-1, 3, 32, 32]), "image": ("BYTES", [-1])}
    assert client.get_server_metadata()["name"] == "autoft"


def test_fp32_infer_through_tritonclient_matches_onnxruntime(server, classifier, digits):
    client = triton.InferenceServerClient(server[0])
    pixels = _pixels(digits, 3)
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("logits", "probabilities")]
    result = client.infer("digits", [tensor], outputs=outputs, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("logits"), classifier.logits(pixels), atol=1e-5)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert result.get_response()["id"] == "r1"


def test_encoded_images_as_bytes_through_tritonclient(server, classifier, digits):
    client = triton.InferenceServerClient(server[0])
    files = [_png(digits, i) for i in range(2)]
    encoded = np.array([base64.b64encode(f) for f in files], dtype=object)
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(encoded, binary_data=False)
    result = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    expected = classifier.probabilities(classifier.pixels([io.BytesIO(f) for f in files]))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    assert result.as_numpy("logits") is None  # only what was asked for


def test_plain_http_endpoints(http, classifier, digits):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/models/digits").json()["parameters"]["labels"] == classifier.classes
    assert http.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    pixels = _pixels(digits, 2)
    body = {"inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]}
    reply = http.post("/v2/models/digits/infer", json=body)
    assert reply.status_code == 200
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["logits"]["shape"] == [2, 10] and outputs["logits"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(2, 10), classifier.logits(pixels), atol=1e-5)

    png = _png(digits, 0)
    expected = classifier.top_k(classifier.probabilities(classifier.pixels([io.BytesIO(png)])), 3)[0]
    for reply in (
        http.post("/predict?top_k=3", files={"file": ("digit.png", png, "image/png")}),
        http.post("/predict?top_k=3", content=png, headers={"content-type": "image/png"}),
    ):
        assert reply.status_code == 200, reply.text
        got = [(p["label"], p["probability"]) for p in reply.json()["predictions"]]
        assert [label for label, _ in got] == [label for label, _ in expected]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=1e-5)


def _valid_body(digits):
    return {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": _pixels(digits, 1).reshape(-1).tolist()}]}


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("malformed json", 400, "not valid JSON"),
        ("not an object", 400, "JSON object"),
        ("wrong tensor name", 400, "unknown input 'pixels'"),
        ("wrong shape", 400, "has shape [-1, 3, 32, 32]"),
        ("data does not fill the shape", 400, "needs 6144 values"),
        ("wrong datatype", 400, "has datatype FP32"),
        ("text in the data", 400, "only numbers"),
        ("undecodable image", 400, "cannot be decoded"),
        ("not base64", 400, "not valid base64"),
        ("unknown output", 400, "unknown output 'scores'"),
        ("unknown model", 404, "unknown model 'other'"),
        ("body over the limit", 413, "over the limit"),
        ("chunked body over the limit", 413, "over the limit"),
        ("predict without an image", 400, "no image"),
        ("predict with an undecodable upload", 400, "cannot be decoded"),
        ("unknown route", 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(http, digits, case, status, message):
    infer = "/v2/models/digits/infer"
    body = _valid_body(digits)
    tensor = body["inputs"][0]
    if case == "malformed json":
        reply = http.post(infer, content=b'{"inputs": [', headers={"content-type": "application/json"})
    elif case == "not an object":
        reply = http.post(infer, json=[1, 2])
    elif case == "wrong tensor name":
        reply = http.post(infer, json={"inputs": [{**tensor, "name": "pixels"}]})
    elif case == "wrong shape":
        reply = http.post(infer, json={"inputs": [{**tensor, "shape": [1, 3, 16, 16]}]})
    elif case == "data does not fill the shape":
        reply = http.post(infer, json={"inputs": [{**tensor, "shape": [2, 3, 32, 32]}]})
    elif case == "wrong datatype":
        reply = http.post(infer, json={"inputs": [{**tensor, "datatype": "INT64"}]})
    elif case == "text in the data":
        reply = http.post(infer, json={"inputs": [{**tensor, "data": ["a"] * 3072}]})
    elif case == "undecodable image":
        reply = http.post(infer, json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"not an image").decode()]}]})
    elif case == "not base64":
        reply = http.post(infer, json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]})
    elif case == "unknown output":
        reply = http.post(infer, json={**body, "outputs": [{"name": "scores"}]})
    elif case == "unknown model":
        reply = http.post("/v2/models/other/infer", json=body)
    elif case == "body over the limit":
        reply = http.post(infer, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"})
    elif case == "chunked body over the limit":  # no Content-Length: counted as it arrives
        reply = http.post(infer, content=iter([b"x" * 65536] * 5), headers={"content-type": "application/json"})
    elif case == "predict without an image":
        reply = http.post("/predict", content=b"")
    elif case == "predict with an undecodable upload":
        reply = http.post("/predict", files={"file": ("x.png", b"garbage", "image/png")})
    else:
        reply = http.get("/v3/anything")
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    # The same server still answers a good request.
    assert http.post(infer, json=body).status_code == 200


def test_concurrent_requests_are_batched_into_one_call(server, digits):
    address, app = server
    client = triton.InferenceServerClient(address, concurrency=8)
    pixels = _pixels(digits, 1)
    tensor = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    calls_before = len(app.state.batcher.batch_sizes)
    pending = [client.async_infer("digits", [tensor]) for _ in range(16)]
    results = [p.get_result() for p in pending]
    sizes = app.state.batcher.batch_sizes[calls_before:]
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 8
    first = results[0].as_numpy("logits")
    for result in results:
        np.testing.assert_allclose(result.as_numpy("logits"), first, atol=1e-5)


def test_batcher_gathers_up_to_max_batch_and_splits_results_back():
    seen = []

    def run(batch):
        seen.append(len(batch))
        return batch * 2

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_delay_ms=50)
        await batcher.start()
        try:
            sizes = [1, 1, 3, 1, 2]
            outs = await asyncio.gather(*(batcher.infer(np.full((n, 1), i, dtype=np.float32)) for i, n in enumerate(sizes)))
        finally:
            await batcher.stop()
        return sizes, outs

    sizes, outs = asyncio.run(scenario())
    assert seen == [2, 4, 2]  # the 3 would overflow 1+1, so it starts the next batch (3+1); then the 2 after the delay
    for i, (n, out) in enumerate(zip(sizes, outs)):
        np.testing.assert_array_equal(out, np.full((n, 1), 2 * i))


def test_a_failing_batch_fails_its_requests_only():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return batch

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_delay_ms=0)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="device lost"):
                await batcher.infer(np.zeros((1, 1)))
            return await batcher.infer(np.ones((1, 1)))
        finally:
            await batcher.stop()

    np.testing.assert_array_equal(asyncio.run(scenario()), np.ones((1, 1)))


def test_serve_binds_localhost_by_default():
    import inspect

    from autoft.cli.serve_cmd import serve_command
    from autoft.serving import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
