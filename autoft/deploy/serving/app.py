"""The FastAPI application: KServe v2 routes and ``POST /predict`` over one model.

Bad input is answered with a 4xx and ``{"error": ...}``; a full queue with 503 and
``Retry-After``; a model that gives non-finite outputs with a JSON 500, after which the
server reports itself not ready. Readiness is earned: false until the model has scored a
probe batch finitely at startup.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from autoft import __version__
from autoft.errors import AutoftError
from autoft.deploy.inference import OnnxClassifier, non_finite_reason, softmax
from autoft.deploy.serving.batcher import Batcher
from autoft.deploy.serving.config import ServeConfig, ServeError
from autoft.deploy.serving.parsing import IMAGE_INPUT, PROBABILITIES_OUTPUT, InferenceRequest, decode_images, parse_infer_request, parse_request_body

MODEL_VERSION = "1"


@dataclass
class Health:
    """Whether the model may be served; ``problem`` says why not."""

    problem: str | None = "the model has not been probed yet"

    @property
    def ready(self) -> bool:
        return self.problem is None

    def refuse_unless_ready(self) -> None:
        if self.problem is not None:
            raise ServeError(f"the model is not ready: {self.problem}", 503)


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
            return await send_json_error(send, 413, f"the request body is over the limit of {self.limit} bytes (--max-body-mb)")
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


async def send_json_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer ``{"error": message}`` from ASGI code that runs outside FastAPI's handlers."""
    body = json.dumps({"error": message}).encode()
    extra = [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]}
    await send(start)
    await send({"type": "http.response.body", "body": body})


def _checked_logits(logits: np.ndarray, pixels: np.ndarray, health: Health) -> np.ndarray:
    """Logits a JSON answer can hold; NaN and infinity cannot be written as JSON numbers.

    Pixels outside [0, 1] are the client's fault (a 400); non-finite outputs for pixels in
    [0, 1] are the model's, and from then on the server reports itself not ready.
    """
    if np.isfinite(logits).all():
        return logits
    if pixels.min() < 0 or pixels.max() > 1:
        raise ServeError(f"the model's outputs are not finite for pixels from {pixels.min():.3g} to {pixels.max():.3g}; send pixels in [0, 1]")
    health.problem = f"{non_finite_reason(logits)} for pixels in [0, 1]; its weights are likely corrupt"
    raise ServeError(f"{health.problem}; this server now reports not ready", 500)


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


# KServe v2 answers "not ready" with a 4xx (Triton sends 400); load balancers and Kubernetes
# probes treat anything outside 2xx-3xx as not ready.
NOT_READY_STATUS = 400


def create_app(classifier: OnnxClassifier, config: ServeConfig | None = None, *, top_k: int = 5):
    """The FastAPI application; ``state.batcher`` reports the batch sizes it ran, ``state.health`` its readiness."""
    config = (config or ServeConfig()).check()
    batcher = Batcher(classifier.logits, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms, max_queue=config.max_queue)
    decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="autoft-decode")
    health = Health()

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        health.problem = await asyncio.to_thread(_probe, classifier)
        yield
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"autoft: {classifier.name}", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.config = config
    app.state.health = health
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

    def readiness(answer: dict[str, Any]):
        if health.ready:
            return {**answer, "ready": True}
        return JSONResponse({**answer, "ready": False, "error": health.problem}, status_code=NOT_READY_STATUS)

    async def run(kind: str, data: Any, names: list[str] | None = None) -> np.ndarray:
        """Logits for parsed pixels or encoded images, within the queue's and decoders' bounds."""
        with batcher.admit(len(data)):
            if kind == "images":
                decode_all = functools.partial(decode_images, data, size, config.max_image_pixels, names)
                data = await asyncio.get_running_loop().run_in_executor(decoders, decode_all)
            return _checked_logits(await batcher.infer(data), data, health)

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
        return readiness({})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        check_model(name, version)
        return metadata

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        check_model(name, version)
        return readiness({"name": name})

    @app.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
    async def infer(name: str, request: Request, version: str | None = None):
        check_model(name, version)
        if "inference-header-content-length" in request.headers:
            raise ServeError("binary tensor data is not supported; send tensors as JSON (binary_data=False)")
        body = await request.body()  # read in full even when refused, so the connection can be kept
        health.refuse_unless_ready()
        batcher.check_room(1)
        payload = parse_request_body(body)
        parsed = parse_infer_request(payload, classifier, config)
        request_id, payload, body = payload.id, None, None  # let the parsed JSON go while this request waits
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
        health.refuse_unless_ready()
        batcher.check_room(1)
        probabilities = softmax(await run("images", [blob], [label]))
        return {
            "model_name": classifier.name,
            "predictions": [{"label": label, "probability": p} for label, p in classifier.top_k(probabilities, top_k)[0]],
        }

    return app


def _probe(classifier: OnnxClassifier) -> str | None:
    """Why the model cannot be served, or ``None`` once it has scored a probe batch finitely."""
    try:
        classifier.probe()
    except AutoftError as exc:
        return str(exc)
    except Exception as exc:  # onnxruntime failing on the probe: the model cannot serve requests either
        return f"the model fails on a probe batch: {exc}"
    return None


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
