"""The OpenAI-compatible HTTP API over a continuous-batching Engine (or an encoder for embeddings/classification)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos_cli.core.batching import Engine, EngineUnavailable, QueueFull
from llmos_cli.core.infer import Completion, EncoderRunner, SamplingParams

# ---------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error_bytes(status: int, message: str, type: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


# ---------------------------------------------------------------- request bodies


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    # Accepted for compatibility only at their neutral values; anything else is a 400, not silently ignored.
    logprobs: Literal[False, 0] | None = None
    top_logprobs: Literal[0] | None = None
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]

    def text(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class EncodeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]


# ---------------------------------------------------------------- metrics


class Histogram:
    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, b in enumerate(self.BUCKETS):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.counts, strict=True)]
        return [
            f"# TYPE {name} histogram",
            *rows,
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.n}",
        ]


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram()
        self.ttft = Histogram()

    def record(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        if path.startswith("/v1/") and status < 400:
            self.latency.observe(seconds)

    def render(self, engine: Engine | None) -> str:
        lines = ["# TYPE llmos_requests_total counter"]
        lines += [
            f'llmos_requests_total{{path="{p}",status="{s}"}} {n}'
            for (p, s), n in sorted(self.requests.items())
        ]
        if engine is not None:
            st = engine.stats
            lines += [
                "# TYPE llmos_prompt_tokens_total counter",
                f"llmos_prompt_tokens_total {st.prompt_tokens}",
                "# TYPE llmos_generated_tokens_total counter",
                f"llmos_generated_tokens_total {st.generated_tokens}",
                "# TYPE llmos_queue_depth gauge",
                f"llmos_queue_depth {engine.queue_depth}",
                "# TYPE llmos_running_requests gauge",
                f"llmos_running_requests {engine.running}",
                "# TYPE llmos_cancelled_requests_total counter",
                f"llmos_cancelled_requests_total {st.requests_cancelled}",
                *self.ttft.lines("llmos_time_to_first_token_seconds"),
            ]
        lines += self.latency.lines("llmos_request_latency_seconds")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- auth, body size, metrics middleware


class Guard:
    """Check the API key (constant time, every route but /health) and the body size (413) before the app runs."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

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
            if path != "/health" and self.api_key is not None and not self._authorized(scope):
                await self._reject(
                    send_recording,
                    401,
                    "invalid or missing API key",
                    "authentication_error",
                    "invalid_api_key",
                )
                return
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._reject(
                    send_recording,
                    413,
                    f"request body is over {self.max_body_bytes} bytes",
                    "invalid_request_error",
                    "request_too_large",
                )
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_capped(receive)
                if body is None:
                    await self._reject(
                        send_recording,
                        413,
                        f"request body is over {self.max_body_bytes} bytes",
                        "invalid_request_error",
                        "request_too_large",
                    )
                    return
                receive = _replay(body, receive)
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
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reject(send: Send, status: int, message: str, type: str, code: str) -> None:
        body = _error_bytes(status, message, type, code)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
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


# ---------------------------------------------------------------- the app


def create_app(
    backend: Engine | EncoderRunner,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    default_max_tokens: int = 256,
    retry_after_s: int = 1,
    drain_timeout_s: float = 30.0,
) -> FastAPI:
    """The FastAPI app. An Engine serves completions and chat; an EncoderRunner serves embeddings or classify."""
    engine = backend if isinstance(backend, Engine) else None
    encoder = backend if isinstance(backend, EncoderRunner) else None
    metrics = Metrics()
    encoder_lock = asyncio.Lock()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.on_first_token = metrics.ttft.observe
            engine.start()
        yield
        if engine is not None:
            await run_in_threadpool(engine.stop, drain_timeout_s)

    app = FastAPI(title="llmos", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid value')}"
            if param
            else str(first.get("msg", "invalid body"))
        )
        return ApiError(400, message, param=param, code="invalid_parameter").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine is not None and not engine.healthy:
            reason = f"model failed: {engine.error}" if engine.error else "engine is not running"
            return JSONResponse({"status": "error", "detail": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llmos"}],
        }

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(
                400,
                f"model '{name}' is not served here; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )

    def need_engine() -> Engine:
        if engine is None:
            raise ApiError(
                400,
                f"'{model_name}' is not a generative model; use /v1/embeddings or /v1/classify",
                code="unsupported_endpoint",
            )
        return engine

    def sampling(body: _Body, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        window = need_engine().runner.context_window
        if window is not None and prompt_len >= window:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens; this model's context window is {window}",
                param="messages" if isinstance(body, ChatBody) else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = (
                default_max_tokens if window is None else min(default_max_tokens, window - prompt_len)
            )
        elif window is not None and prompt_len + max_tokens > window:
            raise ApiError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is over this "
                f"model's context window of {window} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=stop,
        )
        try:
            params.check()
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        return params

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        eng = need_engine()
        ids = [eng.runner.encode(p) for p in prompts]
        params = [sampling(body, len(x), body.max_tokens or 16) for x in ids]
        rid = f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str, finish: str | None, index: int = 0) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            if len(ids) != 1:
                raise ApiError(400, "stream: true takes a single prompt", param="prompt")
            return _sse(
                eng,
                ids[0],
                params[0],
                retry_after_s,
                usage=_wants_usage(body),
                first=None,
                delta=lambda t: chunk(t, None),
                last=lambda c: chunk("", _reason(c)),
            )
        results = await asyncio.gather(
            *(_complete(eng, x, p, request, retry_after_s) for x, p in zip(ids, params, strict=True))
        )
        out = chunk("", None)
        out["choices"] = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": _reason(c)}
            for i, c in enumerate(results)
        ]
        out["usage"] = _usage(results)
        return JSONResponse(out)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        check_model(body.model)
        eng = need_engine()
        try:
            ids = eng.runner.encode_chat([m.text() for m in body.messages])
        except ValueError as err:
            raise ApiError(400, str(err), param="messages") from err
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            return _sse(
                eng,
                ids,
                params,
                retry_after_s,
                usage=_wants_usage(body),
                first=chunk({"role": "assistant", "content": ""}, None),
                delta=lambda t: chunk({"content": t}, None),
                last=lambda c: chunk({}, _reason(c)),
            )
        c = await _complete(eng, ids, params, request, retry_after_s)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": None,
                        "finish_reason": _reason(c),
                    }
                ],
                "usage": _usage([c]),
            }
        )

    async def run_encoder(body: EncodeBody, fn: Callable[[list[str]], Any]) -> tuple[list[str], Any]:
        check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        async with encoder_lock:
            return texts, await run_in_threadpool(fn, texts)

    @app.post("/v1/embeddings")
    async def embeddings(body: EncodeBody) -> dict[str, Any]:
        if encoder is None or encoder.is_classifier:
            raise ApiError(400, f"'{model_name}' does not serve embeddings", code="unsupported_endpoint")
        texts, vectors = await run_encoder(body, encoder.embed)
        n = encoder.count_tokens(texts)
        return {
            "object": "list",
            "model": model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        }

    @app.post("/v1/classify")
    async def classify(body: EncodeBody) -> dict[str, Any]:
        if encoder is None or not encoder.is_classifier:
            raise ApiError(400, f"'{model_name}' is not a classifier", code="unsupported_endpoint")
        _, scores = await run_encoder(body, encoder.classify)
        data = []
        for i, s in enumerate(scores):
            label = max(s, key=s.get)
            data.append({"index": i, "label": label, "score": s[label], "scores": s})
        return {"object": "list", "model": model_name, "data": data}

    return app


# ---------------------------------------------------------------- engine <-> asyncio


def _reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def _usage(results: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in results)
    gen = sum(len(c.token_ids) for c in results)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}


def _submit(
    engine: Engine,
    ids: list[int],
    params: SamplingParams,
    events: asyncio.Queue,
    stream: bool,
    retry_after_s: int,
) -> str:
    loop = asyncio.get_running_loop()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting for this result
            loop.call_soon_threadsafe(events.put_nowait, item)

    try:
        return engine.submit(ids, params, on_delta=put if stream else None, on_finish=put)
    except QueueFull as err:
        raise ApiError(
            503,
            f"the server is busy ({err}); retry shortly",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        ) from err
    except EngineUnavailable as err:
        raise ApiError(
            503, str(err), type="server_error", code="unavailable", headers={"Retry-After": "5"}
        ) from err
    except ValueError as err:
        raise ApiError(400, str(err)) from err


def _failed(err: BaseException) -> ApiError:
    return ApiError(
        500, f"the model failed: {type(err).__name__}: {err}", type="server_error", code="model_error"
    )


async def _complete(
    engine: Engine, ids: list[int], params: SamplingParams, request: Request, retry_after_s: int
) -> Completion:
    """Wait for a request's result; cancel it if the client goes away."""
    events: asyncio.Queue = asyncio.Queue()
    rid = _submit(engine, ids, params, events, stream=False, retry_after_s=retry_after_s)
    try:
        while True:
            try:
                result = await asyncio.wait_for(events.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(rid)
                    raise ApiError(499, "client disconnected", code="client_closed") from None
    except asyncio.CancelledError:
        engine.cancel(rid)
        raise
    if isinstance(result, BaseException):
        raise _failed(result)
    if result.finish_reason == "cancelled":
        raise ApiError(
            503,
            "the request was cancelled: the server is shutting down",
            type="server_error",
            code="cancelled",
        )
    return result


def _wants_usage(body: _Body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _sse(
    engine: Engine,
    ids: list[int],
    params: SamplingParams,
    retry_after_s: int,
    *,
    usage: bool,
    first: dict | None,
    delta: Callable[[str], dict],
    last: Callable[[Completion], dict],
) -> StreamingResponse:
    """Server-sent events: a chunk per text delta, a final chunk with finish_reason, (usage), then [DONE]."""
    events: asyncio.Queue = asyncio.Queue()
    rid = _submit(engine, ids, params, events, stream=True, retry_after_s=retry_after_s)

    async def gen() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                item = await events.get()
                if isinstance(item, str):
                    yield f"data: {json.dumps(delta(item))}\n\n"
                    continue
                if isinstance(item, BaseException):
                    err = _failed(item)
                    payload = {
                        "error": {"message": err.message, "type": err.type, "param": None, "code": err.code}
                    }
                    yield f"data: {json.dumps(payload)}\n\n"
                else:
                    final = last(item)
                    yield f"data: {json.dumps(final)}\n\n"
                    if usage:
                        yield f"data: {json.dumps({**final, 'choices': [], 'usage': _usage([item])})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            engine.cancel(rid)  # a no-op once finished; frees the slot when the client disconnects

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
