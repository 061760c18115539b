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
as Triton's ``max_queue_size`` sheds load). Connections that send no request are closed
(:mod:`autoft.deploy.serving.server`), and a model is served only once it has scored a probe batch
finitely.

The modules: :mod:`~autoft.deploy.serving.config` (limits and errors), :mod:`~autoft.deploy.serving.batcher`,
:mod:`~autoft.deploy.serving.parsing` (parsing and decoding), :mod:`~autoft.deploy.serving.app` (the
FastAPI application) and :mod:`~autoft.deploy.serving.server` (uvicorn and ``serve``).
"""

from autoft.deploy.serving.app import MODEL_VERSION, Health, create_app
from autoft.deploy.serving.batcher import Batcher
from autoft.deploy.serving.config import DEFAULT_MAX_BODY, RETRY_AFTER_SECONDS, Overloaded, ServeConfig, ServeError
from autoft.deploy.serving.parsing import IMAGE_INPUT, PROBABILITIES_OUTPUT, InferenceRequest, decode_images, parse_infer_request, parse_request_body
from autoft.deploy.serving.server import serve, uvicorn_options

__all__ = [
    "Batcher",
    "DEFAULT_MAX_BODY",
    "Health",
    "IMAGE_INPUT",
    "InferenceRequest",
    "MODEL_VERSION",
    "Overloaded",
    "PROBABILITIES_OUTPUT",
    "RETRY_AFTER_SECONDS",
    "ServeConfig",
    "ServeError",
    "create_app",
    "decode_images",
    "parse_infer_request",
    "parse_request_body",
    "serve",
    "uvicorn_options",
]
