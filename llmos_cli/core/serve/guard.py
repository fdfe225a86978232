"""ASGI middleware in front of the app: API key, body size cap, body read deadline and per-route metrics."""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos_cli.core.serve.metrics import Metrics
from llmos_cli.core.serve.protocol import error_bytes


class Guard:
    """Before the app runs: cap the headers (431), check the API key (constant time, every route but /health),
    then read the body, capped (413) and within `body_timeout_s` (408: a client that never finishes its body
    holds nothing)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        max_header_bytes: int,
        body_timeout_s: float,
        metrics: Metrics,
    ):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.max_header_bytes, self.body_timeout_s = max_header_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, path = time.monotonic(), scope["path"]
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.max_header_bytes:
                await self._reject(
                    send_recording,
                    431,
                    f"the request headers are over {self.max_header_bytes} bytes",
                    "invalid_request_error",
                    "headers_too_large",
                )
                return
            if path != "/health" and self.api_key is not None and not self._authorized(scope):
                await self._reject(
                    send_recording,
                    401,
                    "invalid or missing API key",
                    "authentication_error",
                    "invalid_api_key",
                )
                return
            length = dict(scope["headers"]).get(b"content-length")
            too_large = length is not None and (not length.isdigit() or int(length) > self.max_body_bytes)
            if not too_large and scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body = await asyncio.wait_for(self._read_capped(receive), self.body_timeout_s)
                except asyncio.TimeoutError:
                    await self._reject(
                        send_recording,
                        408,
                        f"the request body did not arrive within {self.body_timeout_s:g} s",
                        "invalid_request_error",
                        "request_timeout",
                    )
                    return
                too_large = body is None
                if body is not None:
                    receive = _replay(body, receive)
            if too_large:
                await self._reject(
                    send_recording,
                    413,
                    f"request body is over {self.max_body_bytes} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
                return
            await self.app(scope, receive, send_recording)
        finally:
            self.metrics.record(path if path in KNOWN_PATHS else "other", status, time.monotonic() - start)

    def _authorized(self, scope: Scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    async def _read_capped(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)  # the app sees a short body, then the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reject(send: Send, status: int, message: str, type: str, code: str) -> None:
        body = error_bytes(status, message, type, code)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *([(b"connection", b"close")] if status in (408, 413, 431) else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


KNOWN_PATHS = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/classify",
}
