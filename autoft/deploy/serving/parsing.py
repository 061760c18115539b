"""A KServe v2 request, validated by type before any of it is used, and its images decoded
with each one's size checked from its header first."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, WithJsonSchema

from autoft.deploy.inference import OnnxClassifier, decode, to_pixels
from autoft.deploy.serving.config import ServeConfig, ServeError

IMAGE_INPUT = "image"
PROBABILITIES_OUTPUT = "probabilities"

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

