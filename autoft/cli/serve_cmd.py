"""``autoft serve``: an Open Inference Protocol (KServe v2) REST server with dynamic batching."""

from __future__ import annotations

from typing import Annotated

import typer

from autoft.cli.common import console, guarded


def serve_command(
    model: Annotated[str, typer.Argument(metavar="MODEL_OR_RUN", help="model.onnx, an export folder, a run folder or a search folder.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images gathered into one onnxruntime call; 1 turns batching off.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0.0, help="Longest a request waits for others to join its batch.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body accepted, in MiB.")] = 32.0,
    device: Annotated[str, typer.Option(help="auto (CUDA when a GPU is usable), cpu or cuda.")] = "auto",
) -> None:
    """Serve an exported model over HTTP (KServe v2 and POST /predict)."""
    from autoft.serving import serve

    def announce(classifier) -> None:
        where = "GPU" if "CUDAExecutionProvider" in classifier.providers else "CPU"
        console.print(
            f"serving [bold]{classifier.name}[/bold] on {where} at http://{host}:{port}/v2/models/{classifier.name} "
            f"(batches of up to {max_batch}, {max_delay_ms:g} ms)",
            highlight=False,
        )

    serve(model, host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms, max_body_bytes=int(max_body_mb * 2**20), device=device, on_ready=announce)


def register(app: typer.Typer) -> None:
    app.command("serve")(guarded(serve_command))
