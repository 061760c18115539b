"""``serve``: the app on uvicorn, with connections that cannot be held idle.

uvicorn's ``limit_concurrency`` is not used: it counts idle connections as work and answers
beyond them with a plain-text 503 and a closed connection, often before the client has sent
its body, so that most clients see a reset instead of an answer. Overload is shed by the
app's queue instead (a JSON 503 with ``Retry-After``, the connection kept). uvicorn has no
timeout for reading a request's head either: a fresh connection that sends nothing, or one
byte at a time, is held for ever. Each connection therefore runs through
:class:`GuardedConnection`, which

* closes a connection that has not sent a complete request head within ``header_timeout_s``
  of opening or of its last answer (a slowloris), and
* over ``max_connections`` open sockets closes the longest-idle connection to make room, and
  answers the new one's request with a JSON 503 only when every connection has a request in
  flight, so idle connections never count against work.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import replace
from typing import Any, Callable

from autoft.errors import AutoftError
from autoft.deploy.inference import OnnxClassifier, model_name
from autoft.deploy.serving.app import create_app, send_json_error
from autoft.deploy.serving.config import RETRY_AFTER_SECONDS, ServeConfig

# Open files the server needs besides its connections: the model, libraries, threads' pipes.
FILES_BESIDES_CONNECTIONS = 128
DRAIN_LIMIT = 2**20  # a refused request's body read before answering, so the answer is not lost to a reset
DRAIN_SECONDS = 1.0


class GuardedConnection:
    """Mixed into uvicorn's HTTP protocol class (h11 or httptools) by :func:`guarded_protocol`."""

    header_timeout: float
    max_connections: int

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._await_head()
        if len(self.connections) > self.max_connections and not _make_room(self.connections, self.max_connections, self):
            self.app = self._refuse  # every other connection has a request in flight

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request, which then is not idle
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """Waiting for a request's head: no request started since the wait began, or only one already answered."""
        return self.cycle is self._head_cycle and (self.cycle is None or self.cycle.response_complete)

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_cycle = self.cycle
        self.idle_since = self.loop.time()
        # Not reset by data arriving, unlike uvicorn's keep-alive timer: a head sent a byte at a time still has this long.
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.idle and not self.transport.is_closing():
            self.transport.close()

    async def _refuse(self, scope, receive, send) -> None:
        await _drain(receive)
        message = f"the server has {self.max_connections} connections open, all with requests in flight (--max-connections); retry in {RETRY_AFTER_SECONDS} s"
        await send_json_error(send, 503, message, {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})


def _make_room(connections: set, limit: int, arriving: Any) -> bool:
    """Close the longest-idle connection if the open ones are over ``limit``; False if none is idle."""
    open_ = [c for c in connections if not c.transport.is_closing()]
    if len(open_) <= limit:
        return True  # connections already closing leave room
    idle = [c for c in open_ if c is not arriving and isinstance(c, GuardedConnection) and c.idle]
    if not idle:
        return False
    min(idle, key=lambda c: c.idle_since).transport.close()
    return True


async def _drain(receive) -> None:
    async def read() -> None:
        received = 0
        while received <= DRAIN_LIMIT:
            message = await receive()
            received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    try:
        await asyncio.wait_for(read(), DRAIN_SECONDS)
    except asyncio.TimeoutError:
        pass


def guarded_protocol(config: ServeConfig) -> type:
    """uvicorn's HTTP protocol class with :class:`GuardedConnection`'s limits from ``config``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = {"header_timeout": config.header_timeout_s, "max_connections": config.max_connections}
    return type(f"Guarded{AutoHTTPProtocol.__name__}", (GuardedConnection, AutoHTTPProtocol), limits)


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """What ``uvicorn.Config`` needs for ``config``'s connection limits to hold (tests start servers with it too)."""
    return {"http": guarded_protocol(config), "timeout_keep_alive": config.keep_alive_s, "limit_concurrency": None}


def fit_open_files(config: ServeConfig) -> ServeConfig:
    """Raise the soft limit on open files to fit ``max_connections`` (it is often 1024), or lower
    the cap to fit the hard limit with a warning: past it, uvicorn stops accepting for a second."""
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return config
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.max_connections + FILES_BESIDES_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return config
    allowed = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
    if allowed >= wanted:
        return config
    fitted = max(1, allowed - FILES_BESIDES_CONNECTIONS)
    warnings.warn(f"--max-connections {config.max_connections} lowered to {fitted}: this system allows {hard} open files (ulimit -Hn)", stacklevel=2)
    return replace(config, max_connections=fitted)


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
    (the search's study name, or the run folder's name). A model whose outputs on a probe
    batch are not finite is refused before the port is bound.
    """
    import uvicorn

    config = (config or ServeConfig()).check()
    if name is not None and model_name(name) != name:
        raise AutoftError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only (for example {model_name(name)!r})")
    classifier = model if isinstance(model, OnnxClassifier) else OnnxClassifier.load(model, device)
    classifier.probe()
    if name:
        classifier = replace(classifier, name=name)
    config = fit_open_files(config)
    app = create_app(classifier, config)
    if on_ready:
        on_ready(classifier)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(config))
