"""`llmos serve`: load a model and serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import os

from llmos_cli.console import out
from llmos_cli.errors import UserError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def run(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str = "LLMOS_API_KEY",
    max_batch_size: int = 16,
    max_queue: int = 256,
    model_name: str | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> None:
    """Serve `model` on host:port until SIGTERM/Ctrl-C; in-flight requests get time to finish."""
    import uvicorn

    api_key = os.environ.get(api_key_env) or None
    if host not in LOOPBACK and api_key is None:
        raise UserError(
            f"refusing to listen on {host} without an API key",
            hint=f"set the {api_key_env} environment variable (serve.api_key_env), or bind 127.0.0.1",
        )
    if max_batch_size < 1 or max_queue < 1:
        raise UserError("serve.max_batch_size and serve.max_queue must be at least 1")
    app = build_app(
        model,
        api_key=api_key,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        model_name=model_name,
        device=device,
        precision=precision,
    )
    out.info(f"serving {model} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    ).run()


def build_app(
    model: str,
    *,
    api_key: str | None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    model_name: str | None = None,
    device: str = "auto",
    precision: str = "auto",
):  # noqa: ANN201 - FastAPI, imported lazily
    """Load `model` on `device` and wrap it: a causal LM or seq2seq model gets the generation engine, an
    encoder or classifier its endpoints."""
    from llmos_cli.core.batching import Engine
    from llmos_cli.core.infer import Runner, open_runner
    from llmos_cli.core.models import describe_model
    from llmos_cli.core.server import create_app

    info = describe_model(model)
    runner = open_runner(info, device=device, precision=precision, keys=("serve.device", "serve.precision"))
    backend = (
        Engine(runner, max_batch_size=max_batch_size, max_queue=max_queue)
        if isinstance(runner, Runner)
        else runner
    )
    return create_app(backend, model_name=model_name or info.name, api_key=api_key)
