"""An Open Inference Protocol (KServe v2) REST server for an exported model.

One onnxruntime session sits behind a :class:`Batcher`: concurrent requests wait up to
``max_delay_ms`` to be gathered, up to ``max_batch`` images, into one call, which runs in a
worker thread so that the event loop keeps accepting. Clients send float32 NCHW pixels in
[0, 1] as the ``input`` tensor, or encoded image files as the BYTES ``image`` tensor
(base64 strings, as ``tritonclient`` sends BYTES with ``binary_data=False``); ``POST
/predict`` takes one uploaded file.

No request may take the server down, so every limit is checked before the work it bounds
(:class:`ServeConfig`): the body size as it arrives, the images per request once the JSON
is parsed, each image's pixels from its header before it is decoded, the images decoded at
once, and the images admitted to the batcher's queue (beyond it: 503 with ``Retry-After``,
as Triton's ``max_queue_size`` sheds load). Bad input is answered with a 4xx and
``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Callable, Iterator, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, WithJsonSchema
from starlette.exceptions import HTTPException

from autoft import __version__
from autoft.errors import AutoftError
from autoft.inference import OnnxClassifier, decode, model_name, softmax, to_pixels

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"
MODEL_VERSION = "1"
DEFAULT_MAX_BODY = 32 * 2**20
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServeConfig:
    """Batching and the limits that keep one request, or many, from exhausting the server."""

    max_batch: int = 32  # images gathered into one onnxruntime call
    max_delay_ms: float = 5.0  # longest a request waits for others to join its batch
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_images: int = 64  # images in one request
    max_image_pixels: int = 40_000_000  # width x height of one image, read from its header
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    max_queue: int = 256  # images admitted at once (being decoded or waiting for a batch)
    max_connections: int = 64  # open connections; uvicorn answers 503 beyond them

    def check(self) -> "ServeConfig":
        for flag, value, least in (
            ("--max-batch", self.max_batch, 1),
            ("--max-delay-ms", self.max_delay_ms, 0),
            ("--max-body-mb", self.max_body_bytes, 1),
            ("--max-images", self.max_images, 1),
            ("--max-megapixels", self.max_image_pixels, 1),
            ("--decode-workers", self.decode_workers, 1),
            ("--max-connections", self.max_connections, 1),
        ):
            if not value >= least:
                raise AutoftError(f"{flag} must be at least {least}, not {value}")
        if self.max_queue < self.max_images:
            raise AutoftError(f"--max-queue ({self.max_queue}) must be at least --max-images ({self.max_images}), or no full request could be admitted")
        return self


class ServeError(Exception):
    """A request refused: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class Overloaded(ServeError):
    """The queue is full: the client should retry after ``Retry-After`` seconds."""

    def __init__(self, message: str):
        super().__init__(message, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)})


# ---------------------------------------------------------------------------
# Dynamic batching


@dataclass
class Batcher:
    """Gathers concurrent requests into one call of ``run`` (rows in, rows out).

    ``admit`` bounds the rows in flight, so that memory stays bounded however many requests
    arrive: a caller reserves its rows before decoding them and releases them with the answer.
    """

    run: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    batch_sizes: list[int] = field(default_factory=list)  # one entry per call, for tests and benchmarks

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._carry: tuple[np.ndarray, asyncio.Future] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="autoft-infer")
        self.admitted = 0

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

    @contextmanager
    def admit(self, rows: int) -> Iterator[None]:
        """Reserve ``rows`` of the queue, or raise :class:`Overloaded` when it is full."""
        if self.admitted + rows > self.max_queue:
            raise Overloaded(f"the server is busy ({self.admitted} images queued, --max-queue {self.max_queue}); retry in {RETRY_AFTER_SECONDS} s")
        self.admitted += rows  # only the event loop's thread counts, so no lock is needed
        try:
            yield
        finally:
            self.admitted -= rows

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
# The KServe v2 request, validated by type before any of it is used

# A parameter value is a string, a number or a boolean (the v2 "$parameter").
Parameters = dict[str, Union[StrictBool, StrictInt, StrictFloat, StrictStr]]
# Tensor data: numbers, booleans or strings, nested row-major or flat. It is checked against
# the input's shape and datatype by numpy; validating each of millions of elements here would
# cost seconds, so the schema describes it and the parser holds it as a plain list.
TensorData = Annotated[
    list[Any],
    WithJsonSchema({"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "string"}, {"type": "array"}]}}),
]


class RequestInput(BaseModel):
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: Parameters | None = None
    data: TensorData


class RequestOutput(BaseModel):
    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    id: StrictStr | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


def parse_request_body(body: bytes) -> InferenceRequest:
    """The JSON body as an :class:`InferenceRequest`; a :class:`ServeError` naming the first problem."""
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ServeError(explain_validation_error(exc)) from None


def explain_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    where = ".".join(str(part) for part in first["loc"])
    if not where:
        return f"the request body must be a JSON object with an 'inputs' list: {first['msg']}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


@dataclass
class ParsedRequest:
    kind: str  # "pixels" or "images"
    data: Any  # float32 NCHW pixels, or the encoded image files
    outputs: list[str]


def parse_infer_request(request: InferenceRequest, classifier: OnnxClassifier, config: ServeConfig = ServeConfig()) -> ParsedRequest:
    """Check a validated request against this model and the limits; return what to run."""
    size = classifier.image_size
    if len(request.inputs) != 1:
        raise ServeError(f"'inputs' must hold exactly one tensor: {classifier.input_name!r} (FP32) or {IMAGE_INPUT!r} (BYTES)")
    tensor = request.inputs[0]
    if tensor.shape and tensor.shape[0] > config.max_images:
        raise ServeError(f"{tensor.shape[0]} images in one request; the limit is {config.max_images} (--max-images)", 413)
    outputs = _requested_outputs(request, classifier)
    if tensor.name == classifier.input_name:
        return ParsedRequest("pixels", _pixels(tensor, size), outputs)
    if tensor.name == IMAGE_INPUT:
        return ParsedRequest("images", _encoded_images(tensor), outputs)
    raise ServeError(f"unknown input {tensor.name!r}; this model takes {classifier.input_name!r} (FP32 [-1, 3, {size}, {size}]) or {IMAGE_INPUT!r} (BYTES [-1])")


def _pixels(tensor: RequestInput, size: int) -> np.ndarray:
    name, shape = tensor.name, tensor.shape
    if tensor.datatype != "FP32":
        raise ServeError(f"input {name!r} has datatype FP32, not {tensor.datatype!r}")
    if len(shape) != 4 or shape[1:] != [3, size, size] or shape[0] < 1:
        raise ServeError(f"input {name!r} has shape [-1, 3, {size}, {size}], not {shape}")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):  # ragged, or nested deeper than numpy's dimensions
        raise ServeError(f"input {name!r}: 'data' must be a flat or evenly nested list of numbers") from None
    if values.dtype.kind not in "iuf":
        raise ServeError(f"input {name!r}: 'data' must hold only numbers")
    if values.size != math.prod(shape):
        raise ServeError(f"input {name!r}: shape {shape} needs {math.prod(shape)} values, got {values.size}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
        pixels = values.astype(np.float32).reshape(shape)
    if not np.isfinite(pixels).all():
        raise ServeError(f"input {name!r} holds NaN or infinite values (or values beyond float32's range); pixels are in [0, 1]")
    return pixels


def _encoded_images(tensor: RequestInput) -> list[bytes]:
    name, shape = tensor.name, tensor.shape
    if tensor.datatype != "BYTES":
        raise ServeError(f"input {name!r} has datatype BYTES (base64-encoded image files), not {tensor.datatype!r}")
    try:
        flat = np.asarray(tensor.data, dtype=object).reshape(-1) if tensor.data else np.empty(0, dtype=object)
    except ValueError:  # nested deeper than numpy's dimensions
        raise ServeError(f"input {name!r}: 'data' must be a list of base64 strings") from None
    if len(shape) not in (1, 2) or shape[0] < 1 or math.prod(shape) != shape[0] or len(flat) != shape[0]:
        raise ServeError(f"input {name!r} has shape [-1] (one encoded image per element); got shape {shape} with {len(flat)} elements")
    return [_image_bytes(item, i) for i, item in enumerate(flat)]


def _image_bytes(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise ServeError(f"input {IMAGE_INPUT!r} element {index}: expected a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(f"input {IMAGE_INPUT!r} element {index} is not valid base64") from None


def _requested_outputs(request: InferenceRequest, classifier: OnnxClassifier) -> list[str]:
    known = [classifier.output_name, PROBABILITIES_OUTPUT]
    if request.outputs is None:
        return known
    if (request.parameters or {}).get("binary_data_output") or any((o.parameters or {}).get("binary_data") for o in request.outputs):
        raise ServeError("binary tensor data is not supported; request outputs with binary_data=False")
    for output in request.outputs:
        if output.name not in known:
            raise ServeError(f"unknown output {output.name!r}; this model has {', '.join(map(repr, known))}")
    return [o.name for o in request.outputs]


# ---------------------------------------------------------------------------
# Decoding, with each image's size checked from its header first


def decode_images(blobs: list[bytes], size: int, max_pixels: int, names: list[str] | None = None) -> np.ndarray:
    """Decode encoded image files to float32 NCHW pixels; ``names`` label them in errors."""
    return to_pixels([_decode_one(blob, size, max_pixels, names[i] if names else f"image {i}") for i, blob in enumerate(blobs)], size)


def _decode_one(blob: bytes, size: int, max_pixels: int, label: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as header:  # reads the header only: the size, no pixels
            width, height = header.size
        if width * height > max_pixels:
            raise ServeError(f"{label} is {width}x{height} pixels, over the limit of {max_pixels / 1e6:g} megapixels (--max-megapixels)", 413)
        return decode(io.BytesIO(blob), size)
    except ServeError:
        raise
    except Exception as exc:  # PIL raises many types for a file it cannot read
        raise ServeError(f"{label} cannot be decoded: {pillow_reason(exc)}") from None


def pillow_reason(exc: Exception) -> str:
    """Pillow's message without the address of our in-memory buffer."""
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return reason or type(exc).__name__


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
            return await _send_error(send, 413, f"the request body is over the limit of {self.limit} bytes (--max-body-mb)")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ServeError(f"the request body is over the limit of {self.limit} bytes (--max-body-mb)", 413)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _checked_logits(logits: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Logits a JSON answer can hold; NaN and infinity cannot be written as JSON numbers."""
    if np.isfinite(logits).all():
        return logits
    if pixels.min() < 0 or pixels.max() > 1:
        raise ServeError(f"the model's outputs are not finite for pixels from {pixels.min():.3g} to {pixels.max():.3g}; send pixels in [0, 1]")
    raise RuntimeError("the model returned non-finite logits for pixels in [0, 1]")


def _openapi_with_request_schema(app: FastAPI) -> None:
    """Publish :class:`InferenceRequest` in the OpenAPI document, which fuzzers read.

    The infer route parses its body itself (any content type, as curl and tritonclient send
    it), so FastAPI does not see the model; its definitions join the document's components.
    """
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = {**schema.pop("$defs", {}), "InferenceRequest": schema}
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        document.setdefault("components", {}).setdefault("schemas", {}).update(definitions)
        return document

    app.openapi = openapi


INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(classifier: OnnxClassifier, config: ServeConfig | None = None, *, top_k: int = 5):
    """The FastAPI application; its ``state.batcher`` reports the batch sizes it ran."""
    config = (config or ServeConfig()).check()
    batcher = Batcher(classifier.logits, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms, max_queue=config.max_queue)
    decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="autoft-decode")

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"autoft: {classifier.name}", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.config = config
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    _openapi_with_request_schema(app)

    @app.exception_handler(ServeError)
    async def refused(request, exc: ServeError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    def check_model(name: str, version: str | None = None) -> None:
        if name != classifier.name:
            raise ServeError(f"unknown model {name!r}; this server has {classifier.name!r}", 404)
        if version not in (None, MODEL_VERSION):
            raise ServeError(f"model {name!r} has version {MODEL_VERSION}, not {version!r}", 404)

    async def run(kind: str, data: Any, names: list[str] | None = None) -> np.ndarray:
        """Logits for parsed pixels or encoded images, within the queue's and decoders' bounds."""
        with batcher.admit(len(data)):
            if kind == "images":
                decode_all = functools.partial(decode_images, data, size, config.max_image_pixels, names)
                data = await asyncio.get_running_loop().run_in_executor(decoders, decode_all)
            return _checked_logits(await batcher.infer(data), data)

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

    @app.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
    async def infer(name: str, request: Request, version: str | None = None):
        check_model(name, version)
        if "inference-header-content-length" in request.headers:
            raise ServeError("binary tensor data is not supported; send tensors as JSON (binary_data=False)")
        payload = parse_request_body(await request.body())
        parsed = parse_infer_request(payload, classifier, config)
        request_id, payload = payload.id, None  # let the parsed JSON go while this request waits
        logits = await run(parsed.kind, parsed.data)
        tensors = {classifier.output_name: logits, PROBABILITIES_OUTPUT: softmax(logits)}
        response: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
        if request_id is not None:
            response["id"] = request_id
        response["outputs"] = [
            {"name": out, "datatype": "FP32", "shape": list(tensors[out].shape), "data": tensors[out].reshape(-1).tolist()} for out in parsed.outputs
        ]
        return response

    @app.post("/predict", openapi_extra=PREDICT_BODY)
    async def predict(request: Request, top_k: int = top_k):
        """One image: a multipart upload (any field name) or the raw file as the body."""
        if top_k < 1:
            raise ServeError("top_k must be at least 1")
        blob, label = await _uploaded_image(request)
        probabilities = softmax(await run("images", [blob], [label]))
        return {
            "model_name": classifier.name,
            "predictions": [{"label": label, "probability": p} for label, p in classifier.top_k(probabilities, top_k)[0]],
        }

    return app


async def _uploaded_image(request: Request) -> tuple[bytes, str]:
    """The one image of a ``/predict`` request and how errors name it (its filename, if uploaded)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=2, max_fields=16) as form:
            files = [value for _, value in form.multi_items() if hasattr(value, "read")]
            if len(files) != 1:
                raise ServeError(f"upload exactly one image file, got {len(files)}")
            blob, label = await files[0].read(), f"upload {files[0].filename or 'image'!r}"
    else:
        blob, label = await request.body(), "the image"
    if not blob:
        raise ServeError("no image in the request")
    return blob, label


def serve(
    model,
    config: ServeConfig | None = None,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    log_level: str = "info",
    on_ready: Callable[[OnnxClassifier], None] | None = None,
) -> None:
    """Serve ``model`` (model.onnx, an export, run or search folder) until interrupted.

    The model answers at ``/v2/models/<name>``: ``name``, else the name its export recorded
    (the search's study name, or the run folder's name).
    """
    import uvicorn

    config = (config or ServeConfig()).check()
    if name is not None and model_name(name) != name:
        raise AutoftError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only (for example {model_name(name)!r})")
    classifier = model if isinstance(model, OnnxClassifier) else OnnxClassifier.load(model, device)
    if name:
        classifier = replace(classifier, name=name)
    app = create_app(classifier, config)
    if on_ready:
        on_ready(classifier)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=config.max_connections)
