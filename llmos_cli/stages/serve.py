"""`llmos serve`: load a model and serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import os
from typing import Any

from llmos_cli.console import out
from llmos_cli.errors import UserError
from llmos_cli.recipe import ServeLimits

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
    limits: ServeLimits | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> None:
    """Serve `model` on host:port until SIGTERM/Ctrl-C: in-flight requests get `limits.shutdown_grace_s` to
    finish, a second signal ends that at once; exit 0 either way."""
    from llmos_cli.core.serve.listen import GracefulServer

    limits = limits or ServeLimits()
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
        limits=limits,
        device=device,
        precision=precision,
    )
    out.info(f"serving {model} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    engine = app.state.engine
    GracefulServer(
        server_config(app, host=host, port=port, limits=limits), on_force=engine.hurry if engine else None
    ).run()


def server_config(app: Any, *, host: str, port: int, limits: ServeLimits, log_level: str = "info") -> Any:
    """The uvicorn.Config for `app` with the connection limits: header size (also while headers arrive; the
    Guard caps complete ones), a deadline for request headers, idle keep-alive, concurrent connections (503 past
    it) and the shutdown grace period."""
    import uvicorn

    from llmos_cli.core.serve.listen import header_deadline_protocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_deadline_protocol(limits.request_timeout_s),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=limits.shutdown_grace_s,
    )


def app_limits(limits: ServeLimits) -> dict[str, Any]:
    """create_app's keyword arguments for `limits`."""
    return {
        "max_body_bytes": limits.max_body_bytes,
        "max_header_bytes": limits.max_header_bytes,
        "body_timeout_s": limits.request_timeout_s,
        "drain_timeout_s": limits.shutdown_grace_s,
    }


def build_app(
    model: str,
    *,
    api_key: str | None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    model_name: str | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    precision: str = "auto",
):  # noqa: ANN201 - FastAPI, imported lazily
    """Load `model` on `device` and wrap it: a causal LM or seq2seq model gets the generation engine, an
    encoder or classifier its endpoints."""
    from llmos_cli.core.models import describe_model
    from llmos_cli.core.serve import create_app
    from llmos_cli.core.serve.engine import Engine
    from llmos_cli.core.serve.runners import Runner, open_runner

    info = describe_model(model)
    runner = open_runner(info, device=device, precision=precision, keys=("serve.device", "serve.precision"))
    backend = (
        Engine(runner, max_batch_size=max_batch_size, max_queue=max_queue)
        if isinstance(runner, Runner)
        else runner
    )
    return create_app(
        backend, model_name=model_name or info.name, api_key=api_key, **app_limits(limits or ServeLimits())
    )
