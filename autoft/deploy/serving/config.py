"""The server's limits, and the errors a request is refused with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from autoft.errors import AutoftError

DEFAULT_MAX_BODY = 32 * 2**20
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServeConfig:
    """Batching and the limits that keep one request, or many, from exhausting the server.

    Overload is shed by the queue (``max_queue``: a JSON 503 with ``Retry-After``), not by
    the connection cap, which is a safety net against running out of sockets: a connection
    over it first closes the longest-idle one, and only when every connection has a request
    in flight is its request answered 503.
    """

    max_batch: int = 32  # images gathered into one onnxruntime call
    max_delay_ms: float = 5.0  # longest a request waits for others to join its batch
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_images: int = 64  # images in one request
    max_image_pixels: int = 40_000_000  # width x height of one image, read from its header
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    max_queue: int = 256  # images admitted at once (being decoded or waiting for a batch)
    max_connections: int = 1000  # open sockets; idle ones are closed first to make room
    header_timeout_s: float = 10.0  # to send a request's head, from connecting or from the last answer
    keep_alive_s: int = 5  # an idle kept-alive connection is closed after this

    def check(self) -> "ServeConfig":
        for flag, value, least in (
            ("--max-batch", self.max_batch, 1),
            ("--max-delay-ms", self.max_delay_ms, 0),
            ("--max-body-mb", self.max_body_bytes, 1),
            ("--max-images", self.max_images, 1),
            ("--max-megapixels", self.max_image_pixels, 1),
            ("--decode-workers", self.decode_workers, 1),
            ("--max-connections", self.max_connections, 1),
            ("--header-timeout", self.header_timeout_s, 0.001),
            ("--keep-alive", self.keep_alive_s, 1),
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
