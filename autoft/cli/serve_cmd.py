"""``autoft serve``: an Open Inference Protocol (KServe v2) REST server with dynamic batching."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from autoft.cli.common import console, guarded

_DEFAULT_DECODERS = "min(4, CPUs)"


def serve_command(
    model: Annotated[str, typer.Argument(metavar="MODEL_OR_RUN", help="model.onnx, an export folder, a run folder or a search folder.")],
    name: Annotated[Optional[str], typer.Option(help="Serve the model as /v2/models/NAME. \\[default: the name its export recorded: the search's study, else the run folder's name]")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images gathered into one onnxruntime call; 1 turns batching off.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0.0, help="Longest a request waits for others to join its batch.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body accepted, in MiB (413 beyond).")] = 32.0,
    max_images: Annotated[int, typer.Option(min=1, help="Most images in one request (413 beyond).")] = 64,
    max_megapixels: Annotated[float, typer.Option(min=0.001, help="Largest image, width x height in millions of pixels, read from its header before decoding (413 beyond).")] = 40.0,
    decode_workers: Annotated[Optional[int], typer.Option(min=1, help=f"Images decoded at once. \\[default: {_DEFAULT_DECODERS}]")] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Most images being decoded or waiting for a batch; beyond it requests get 503 with Retry-After.")] = 256,
    max_connections: Annotated[int, typer.Option(min=1, help="Most open connections, a safety cap: beyond it the longest-idle connection is closed, or, if every one has a request in flight, the request gets 503.")] = 1000,
    header_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a connection has to send a request's head, from opening or from its last answer; then it is closed.")] = 10.0,
    keep_alive: Annotated[int, typer.Option(min=1, help="Seconds an idle kept-alive connection stays open.")] = 5,
    device: Annotated[str, typer.Option(help="auto (CUDA when a GPU is usable), cpu or cuda.")] = "auto",
) -> None:
    """Serve an exported model over HTTP (KServe v2 and POST /predict)."""
    from autoft.deploy.serving import ServeConfig, serve

    limits = dict(max_images=max_images, max_image_pixels=int(max_megapixels * 1e6), max_queue=max_queue, max_connections=max_connections, header_timeout_s=header_timeout, keep_alive_s=keep_alive)
    if decode_workers is not None:
        limits["decode_workers"] = decode_workers
    config = ServeConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_body_bytes=int(max_body_mb * 2**20), **limits)

    def announce(classifier) -> None:
        where = "GPU" if "CUDAExecutionProvider" in classifier.providers else "CPU"
        console.print(
            f"serving [bold]{classifier.name}[/bold] on {where} at http://{host}:{port}/v2/models/{classifier.name} "
            f"(batches of up to {max_batch}, {max_delay_ms:g} ms; up to {max_images} images of {max_megapixels:g} MP per request)",
            highlight=False,
        )

    serve(model, config, name=name, host=host, port=port, device=device, on_ready=announce)


def register(app: typer.Typer) -> None:
    app.command("serve")(guarded(serve_command))
