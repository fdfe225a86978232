"""The OpenAI-compatible HTTP server: `create_app` builds it; `llmos serve` runs it under uvicorn."""

from llmos_cli.core.serve.app import create_app

__all__ = ["create_app"]
