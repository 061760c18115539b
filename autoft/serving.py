"""An Open Inference Protocol (KServe v2) REST server for an exported model.

One onnxruntime session sits behind a :class:`Batcher`: concurrent requests wait up to
``max_delay_ms`` to be gathered, up to ``max_batch`` images, into one call, which runs in a
worker thread so that the event loop keeps accepting. Clients send float32 NCHW pixels in
[0, 1] as the ``input`` tensor, or encoded image files as the BYTES ``image`` tensor
(base64 strings, as ``tritonclient`` sends BYTES with ``binary_data=False``); ``POST
/predict`` takes one uploaded file. Bad input is answered with a 4xx and ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from autoft import __version__
from autoft.inference import OnnxClassifier, decode, softmax, to_pixels

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"
MODEL_VERSION = "1"
DEFAULT_MAX_BODY = 32 * 2**20


class ClientError(Exception):
    """A request the client must fix: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Dynamic batching


@dataclass
class Batcher:
    """Gathers concurrent requests into one call of ``run`` (rows in, rows out)."""

    run: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 32
    max_delay_ms: float = 5.0
    batch_sizes: list[int] = field(default_factory=list)  # one entry per call, for tests and benchmarks

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: tuple[np.ndarray, asyncio.Future] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="autoft-infer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError("the batcher has not been started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((rows, future))
        return await future

    async def _next(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future]:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        items = [await self._next(None)]
        rows = len(items[0][0])
        deadline = loop.time() + self.max_delay_ms / 1000
        while rows < self.max_batch:
            remaining = deadline - loop.time()
            try:
                # Whatever is queued already joins without waiting, even once the delay is spent.
                item = self._queue.get_nowait() if remaining <= 0 else await self._next(remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if rows + len(item[0]) > self.max_batch:
                self._carry = item  # would overflow the batch: it starts the next one
                break
            items.append(item)
            rows += len(item[0])
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [(rows, future) for rows, future in items if not future.cancelled()]
            if not items:
                continue
            batch = np.concatenate([rows for rows, _ in items]) if len(items) > 1 else items[0][0]
            self.batch_sizes.append(len(batch))
            try:
                outputs = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as exc:  # the requests fail; the server keeps serving
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for rows, future in items:
                if not future.done():
                    future.set_result(outputs[start : start + len(rows)])
                start += len(rows)


# ---------------------------------------------------------------------------
# Request parsing


def parse_infer_request(payload: Any, classifier: OnnxClassifier) -> tuple[str, Any, list[str] | None]:
    """Validate a v2 inference request; return (input kind, data, requested output names)."""
    if not isinstance(payload, dict):
        raise ClientError("the request body must be a JSON object with an 'inputs' list")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(f"'inputs' must hold exactly one tensor: {classifier.input_name!r} (FP32) or {IMAGE_INPUT!r} (BYTES)")
    tensor = inputs[0]
    name, datatype, shape, data = tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ClientError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if not isinstance(data, list):
        raise ClientError(f"input {name!r}: 'data' must be a JSON list (send with binary_data=False)")
    size = classifier.image_size
    if name == classifier.input_name:
        if datatype != "FP32":
            raise ClientError(f"input {name!r} has datatype FP32, not {datatype!r}")
        if len(shape) != 4 or shape[1:] != [3, size, size] or shape[0] < 1:
            raise ClientError(f"input {name!r} has shape [-1, 3, {size}, {size}], not {shape}")
        try:
            pixels = np.asarray(data, dtype=np.float32)
        except (ValueError, TypeError):
            raise ClientError(f"input {name!r}: 'data' must hold only numbers") from None
        if pixels.size != math.prod(shape):
            raise ClientError(f"input {name!r}: shape {shape} needs {math.prod(shape)} values, got {pixels.size}")
        return "pixels", pixels.reshape(shape), _requested_outputs(payload)
    if name == IMAGE_INPUT:
        if datatype != "BYTES":
            raise ClientError(f"input {name!r} has datatype BYTES (base64-encoded image files), not {datatype!r}")
        flat = np.asarray(data, dtype=object).reshape(-1) if data else np.empty(0, dtype=object)
        if len(shape) not in (1, 2) or shape[0] < 1 or math.prod(shape) != shape[0] or len(flat) != shape[0]:
            raise ClientError(f"input {name!r} has shape [-1] (one encoded image per element); got shape {shape} with {len(flat)} elements")
        return "images", [_image_bytes(item, i) for i, item in enumerate(flat)], _requested_outputs(payload)
    raise ClientError(f"unknown input {name!r}; this model takes {classifier.input_name!r} (FP32 [-1, 3, {size}, {size}]) or {IMAGE_INPUT!r} (BYTES [-1])")


def _image_bytes(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise ClientError(f"input {IMAGE_INPUT!r} element {index}: expected a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"input {IMAGE_INPUT!r} element {index} is not valid base64") from None


def _requested_outputs(payload: dict) -> list[str] | None:
    outputs = payload.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise ClientError("'outputs' must be a list of objects with a 'name'")
    for output in outputs:
        if (output.get("parameters") or {}).get("binary_data"):
            raise ClientError("binary tensor data is not supported; request outputs with binary_data=False")
    return [o["name"] for o in outputs]


def decode_images(blobs: list[bytes], size: int) -> np.ndarray:
    images = []
    for index, blob in enumerate(blobs):
        try:
            images.append(decode(io.BytesIO(blob), size))
        except Exception as exc:  # PIL raises many types for a file it cannot read
            raise ClientError(f"image {index} cannot be decoded: {type(exc).__name__}") from None
    return to_pixels(images, size)


# ---------------------------------------------------------------------------
# The application


class _BodyLimit:
    """Refuse bodies over ``limit`` bytes, whether or not they declare a Content-Length."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, f"the request body is over the limit of {self.limit} bytes")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ClientError(f"the request body is over the limit of {self.limit} bytes", 413)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(
    classifier: OnnxClassifier,
    *,
    max_batch: int = 32,
    max_delay_ms: float = 5.0,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    top_k: int = 5,
):
    """The FastAPI application; its ``state.batcher`` reports the batch sizes it ran."""
    batcher = Batcher(classifier.logits, max_batch=max_batch, max_delay_ms=max_delay_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"autoft: {classifier.name}", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ClientError)
    async def client_error(request, exc: ClientError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    def check_model(name: str, version: str | None = None) -> None:
        if name != classifier.name:
            raise ClientError(f"unknown model {name!r}; this server has {classifier.name!r}", 404)
        if version not in (None, MODEL_VERSION):
            raise ClientError(f"model {name!r} has version {MODEL_VERSION}, not {version!r}", 404)

    size = classifier.image_size
    metadata = {
        "name": classifier.name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": classifier.input_name, "datatype": "FP32", "shape": [-1, 3, size, size]},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": classifier.output_name, "datatype": "FP32", "shape": [-1, len(classifier.classes)]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(classifier.classes)]},
        ],
        "parameters": {"labels": classifier.classes},
    }

    @app.get("/v2")
    async def server_metadata():
        return {"name": "autoft", "version": __version__, "extensions": []}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        check_model(name, version)
        return metadata

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        check_model(name, version)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        check_model(name, version)
        if "inference-header-content-length" in request.headers:
            raise ClientError("binary tensor data is not supported; send tensors as JSON (binary_data=False)")
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ClientError(f"the request body is not valid JSON: {exc}") from None
        kind, data, wanted = parse_infer_request(payload, classifier)
        pixels = data if kind == "pixels" else await asyncio.to_thread(decode_images, data, size)
        logits = await batcher.infer(pixels)
        tensors = {classifier.output_name: logits, PROBABILITIES_OUTPUT: softmax(logits)}
        for output in wanted or []:
            if output not in tensors:
                raise ClientError(f"unknown output {output!r}; this model has {', '.join(map(repr, tensors))}")
        response: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
        if isinstance(payload.get("id"), str):
            response["id"] = payload["id"]
        response["outputs"] = [
            {"name": out, "datatype": "FP32", "shape": list(tensors[out].shape), "data": tensors[out].reshape(-1).tolist()}
            for out in (wanted or tensors)
        ]
        return response

    @app.post("/predict")
    async def predict(request: Request, top_k: int = top_k):
        """One image: a multipart upload (any field name) or the raw file as the body."""
        if top_k < 1:
            raise ClientError("top_k must be at least 1")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            files = [value for _, value in form.multi_items() if hasattr(value, "read")]
            if len(files) != 1:
                raise ClientError(f"upload exactly one image file, got {len(files)}")
            blob = await files[0].read()
        else:
            blob = await request.body()
        if not blob:
            raise ClientError("no image in the request")
        pixels = await asyncio.to_thread(decode_images, [blob], size)
        probabilities = softmax(await batcher.infer(pixels))
        return {
            "model_name": classifier.name,
            "predictions": [{"label": label, "probability": p} for label, p in classifier.top_k(probabilities, top_k)[0]],
        }

    return app


def serve(
    model,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_delay_ms: float = 5.0,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    device: str = "auto",
    log_level: str = "info",
    on_ready: Callable[[OnnxClassifier], None] | None = None,
) -> None:
    """Serve ``model`` (model.onnx, an export, run or search folder) until interrupted."""
    import uvicorn

    from autoft.errors import AutoftError

    if max_batch < 1 or max_delay_ms < 0:
        raise AutoftError("--max-batch must be at least 1 and --max-delay-ms at least 0")
    classifier = model if isinstance(model, OnnxClassifier) else OnnxClassifier.load(model, device)
    app = create_app(classifier, max_batch=max_batch, max_delay_ms=max_delay_ms, max_body_bytes=max_body_bytes)
    if on_ready:
        on_ready(classifier)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
