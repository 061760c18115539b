"""The KServe v2 server: tritonclient and plain HTTP clients, dynamic batching, bad requests."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from autoft.deploy.inference import OnnxClassifier
from autoft.deploy.serving import Batcher, ServeConfig, create_app, uvicorn_options

MAX_BODY = 256 * 1024
MAX_IMAGES = 4
MAX_PIXELS = 48 * 48  # the digits are 32x32


@pytest.fixture(scope="module")
def classifier(digits_onnx):
    return OnnxClassifier.load(digits_onnx, device="cpu")


@pytest.fixture(scope="module")
def server(classifier, live_app):
    """A live uvicorn server on 127.0.0.1 as ``autoft serve`` runs it, in a thread; yields (address, app)."""
    config = ServeConfig(max_batch=8, max_delay_ms=30, max_body_bytes=MAX_BODY, max_images=MAX_IMAGES, max_image_pixels=MAX_PIXELS, max_queue=64)
    app = create_app(classifier, config)
    return live_app(app, **uvicorn_options(config)), app


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


def _images_body(files: list[bytes]) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES", "data": [base64.b64encode(f).decode() for f in files]}]}


def _nested(depth: int) -> str:
    return "[" * depth + "0.5" + "]" * depth


def _png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


INFER = "/v2/models/digits/infer"
FILLED = 3 * 32 * 32
# case -> (the request, as (method, path, httpx keyword arguments), status, message)
BAD_REQUESTS = {
    "malformed json": (lambda d: ("POST", INFER, {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}), 400, "not valid JSON"),
    "not an object": (lambda d: ("POST", INFER, {"json": [1, 2]}), 400, "JSON object"),
    "inputs not a list": (lambda d: ("POST", INFER, {"json": {"inputs": 5}}), 400, "inputs: Input should be a valid"),
    "wrong tensor name": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "name": "pixels"}]}}), 400, "unknown input 'pixels'"),
    "wrong shape": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "shape": [1, 3, 16, 16]}]}}), 400, "has shape [-1, 3, 32, 32]"),
    "shape of strings": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "shape": ["1", 3, 32, 32]}]}}), 400, "inputs.0.shape.0"),
    "negative shape": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "shape": [-1, 3, 32, 32]}]}}), 400, "inputs.0.shape.0"),
    "data does not fill the shape": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "shape": [2, 3, 32, 32]}]}}), 400, "needs 6144 values"),
    "wrong datatype": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "datatype": "INT64"}]}}), 400, "has datatype FP32"),
    "text in the data": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "data": ["a"] * FILLED}]}}), 400, "only numbers"),
    "data not a list": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "data": "x"}]}}), 400, "inputs.0.data"),
    "NaN pixels": (lambda d: ("POST", INFER, {"content": json.dumps({"inputs": [{**_valid_body(d)["inputs"][0], "data": [float("nan")] * FILLED}]})}), 400, "NaN or infinite"),
    "1e400 pixels": (lambda d: ("POST", INFER, {"content": '{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [' + ",".join(["1e400"] * FILLED) + "]}]}"}), 400, "NaN or infinite"),
    "1e39 pixels, beyond float32": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "data": [1e39] * FILLED}]}}), 400, "beyond float32's range"),
    "1e38 pixels, finite but with infinite logits": (lambda d: ("POST", INFER, {"json": {"inputs": [{**_valid_body(d)["inputs"][0], "data": [1e38] * FILLED}]}}), 400, "send pixels in [0, 1]"),
    "deeply nested data": (lambda d: ("POST", INFER, {"content": '{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ' + _nested(100_000) + "}]}"}), 400, "not valid JSON"),
    "nested deeper than numpy allows": (lambda d: ("POST", INFER, {"content": '{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ' + _nested(100) + "}]}"}), 400, "evenly nested"),
    "output parameters not an object": (lambda d: ("POST", INFER, {"json": {**_valid_body(d), "outputs": [{"name": "logits", "parameters": "x"}]}}), 400, "outputs.0.parameters"),
    "binary outputs": (lambda d: ("POST", INFER, {"json": {**_valid_body(d), "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}}), 400, "binary tensor data is not supported"),
    "id not a string": (lambda d: ("POST", INFER, {"json": {**_valid_body(d), "id": 5}}), 400, "id: Input should be a valid string"),
    "undecodable image": (lambda d: ("POST", INFER, {"json": _images_body([b"not an image"])}), 400, "image 0 cannot be decoded: cannot identify image file"),
    "not base64": (lambda d: ("POST", INFER, {"json": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}}), 400, "not valid base64"),
    "more images than --max-images": (lambda d: ("POST", INFER, {"json": _images_body([_png(d, 0)] * (MAX_IMAGES + 1))}), 413, f"5 images in one request; the limit is {MAX_IMAGES} (--max-images)"),
    "an image over --max-megapixels": (lambda d: ("POST", INFER, {"json": _images_body([_png(d, 0), _png_of_size(100, 100)])}), 413, "image 1 is 100x100 pixels, over the limit"),
    "unknown output": (lambda d: ("POST", INFER, {"json": {**_valid_body(d), "outputs": [{"name": "scores"}]}}), 400, "unknown output 'scores'"),
    "unknown model": (lambda d: ("POST", "/v2/models/other/infer", {"json": _valid_body(d)}), 404, "unknown model 'other'"),
    "body over the limit": (lambda d: ("POST", INFER, {"content": b"x" * (MAX_BODY + 1), "headers": {"content-type": "application/json"}}), 413, "over the limit"),
    # No Content-Length: counted as it arrives.
    "chunked body over the limit": (lambda d: ("POST", INFER, {"content": iter([b"x" * 65536] * 5), "headers": {"content-type": "application/json"}}), 413, "over the limit"),
    "predict without an image": (lambda d: ("POST", "/predict", {"content": b""}), 400, "no image"),
    "predict with an undecodable upload": (lambda d: ("POST", "/predict", {"files": {"file": ("x.png", b"garbage", "image/png")}}), 400, "upload 'x.png' cannot be decoded: cannot identify image file"),
    "predict with a truncated upload": (lambda d: ("POST", "/predict", {"files": {"file": ("cut.png", _png_of_size(40, 40)[:-30], "image/png")}}), 400, "upload 'cut.png' cannot be decoded: "),
    "predict with an image over --max-megapixels": (lambda d: ("POST", "/predict", {"files": {"file": ("big.png", _png_of_size(100, 100), "image/png")}}), 413, "upload 'big.png' is 100x100 pixels"),
    "predict with top_k not a number": (lambda d: ("POST", "/predict?top_k=abc", {"content": b"x"}), 400, "top_k"),
    "unknown route": (lambda d: ("GET", "/v3/anything", {}), 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(http, digits, case):
    build, status, message = BAD_REQUESTS[case]
    method, path, kwargs = build(digits)
    reply = http.request(method, path, **kwargs)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    # The same server still answers a good request.
    assert http.post(INFER, json=_valid_body(digits)).status_code == 200


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
    from autoft.deploy.serving import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"


# ---------------------------------------------------------------------------
# The served name: the run's, recorded by the export


def test_the_default_name_is_the_searchs_study_else_the_run_folders(tmp_path):
    from autoft.deploy.exporting import run_name
    from autoft.core.io import write_json

    best = tmp_path / "runs" / "photos" / "best"
    best.mkdir(parents=True)
    assert run_name(best) == "photos"  # a search folder's best/, before its metrics are written
    write_json(best / "metrics.json", {"study": "photos-2024"})
    assert run_name(best) == "photos-2024"
    write_json(best / "metrics.json", ["not", "an object"])
    assert run_name(best) == "photos"
    one = tmp_path / "one"
    one.mkdir()
    write_json(one / "metrics.json", {"val_accuracy": 0.9})  # a train run records no study
    assert run_name(one) == "one"


def test_export_triton_predict_and_serve_agree_on_the_study_name(tmp_path, digits_run, digits, live_app):
    import shutil

    from autoft.deploy.exporting import export
    from autoft.core.io import read_json, write_json

    search = tmp_path / "runs" / "photos"
    (search / "best").mkdir(parents=True)
    shutil.copyfile(digits_run / "model.pt", search / "best" / "model.pt")
    write_json(search / "best" / "metrics.json", {"study": "photos:v2"})
    export(search, triton=True, images=digits.val.subset(range(32)))
    name = "photos_v2"  # the study name, made safe for URLs and Triton
    assert read_json(search / "best" / "preprocess.json")["name"] == name
    assert f'name: "{name}"' in (search / "best" / "triton" / name / "config.pbtxt").read_text()
    classifier = OnnxClassifier.load(search, device="cpu")  # what predict and serve load
    assert classifier.name == name
    address = live_app(create_app(classifier))
    assert httpx.get(f"http://{address}/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert httpx.get(f"http://{address}/v2/models/test_resnet/ready").status_code == 404


def test_serve_name_overrides_the_recorded_one(monkeypatch, digits_onnx, live_app):
    from autoft.errors import AutoftError
    from autoft.deploy.serving import serve
    from autoft.deploy.serving.server import GuardedConnection

    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: started.append((app, options)))
    serve(digits_onnx, name="photos", device="cpu")
    (app, options), = started
    assert options["host"] == "127.0.0.1" and options["limit_concurrency"] is None  # the app's queue sheds load, not uvicorn
    assert options["timeout_keep_alive"] == ServeConfig().keep_alive_s and issubclass(options["http"], GuardedConnection)
    address = live_app(app, **{k: v for k, v in options.items() if k not in ("host", "port", "log_level")})
    assert httpx.get(f"http://{address}/v2/models/photos/ready").status_code == 200
    assert httpx.get(f"http://{address}/v2/models/digits/ready").status_code == 404
    with pytest.raises(AutoftError, match="--name 'my model': use letters, digits"):
        serve(digits_onnx, name="my model", device="cpu")
