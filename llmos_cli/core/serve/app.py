"""The OpenAI-compatible HTTP API over a continuous-batching Engine (or an encoder for embeddings/classification).

Only the routes the backend serves appear in the OpenAPI schema; the others answer 400, naming the ones to use.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmos_cli.core.serve.engine import Engine
from llmos_cli.core.serve.guard import Guard
from llmos_cli.core.serve.logprobs import chat_logprobs, completion_logprobs, token_decoder
from llmos_cli.core.serve.metrics import Metrics
from llmos_cli.core.serve.protocol import (
    MAX_SEQUENCES,
    SSE,
    ApiError,
    ChatBody,
    ChatResponse,
    ClassifyResponse,
    CompletionBody,
    CompletionResponse,
    EmbeddingsResponse,
    EncodeBody,
    Health,
    ModelList,
    SamplingBody,
    errors,
    pin_openapi,
)
from llmos_cli.core.serve.runners import EncoderRunner, SamplingParams
from llmos_cli.core.serve.stream import complete, finish_reason, stream_events, usage_of, wants_usage

GENERATE_ERRORS = errors(400, 401, 413, 500, 503)
ENCODE_ERRORS = errors(400, 401, 413)


def create_app(
    backend: Engine | EncoderRunner,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_header_bytes: int = 16 << 10,
    body_timeout_s: float = 30.0,
    default_max_tokens: int = 256,
    retry_after_s: int = 1,
    drain_timeout_s: float = 30.0,
) -> FastAPI:
    """The FastAPI app. An Engine serves completions and chat; an EncoderRunner serves embeddings or classify.
    `app.state.engine` is the Engine (or None), for whoever runs the server."""
    engine = backend if isinstance(backend, Engine) else None
    encoder = backend if isinstance(backend, EncoderRunner) else None
    window = engine.runner.context_window if engine is not None else None
    vocab = engine.runner.model.config.get_text_config().vocab_size if engine is not None else None
    decode = token_decoder(engine.runner.tokenizer) if engine is not None else None
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
    app.state.engine = engine
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_header_bytes=max_header_bytes,
        body_timeout_s=body_timeout_s,
        metrics=metrics,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = pin_openapi(FastAPI.openapi(app), model_name, window, vocab)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def _http_error(
        request: Request, err: HTTPException
    ) -> JSONResponse:  # 404, 405, an unreadable body
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(err.status_code, str(err.detail), code=code, headers=err.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        content_type = request.headers.get("content-type", "").lower()
        if first.get("loc") == ("body",) and content_type and "json" not in content_type:
            message = f"the body must be JSON, sent with Content-Type: application/json (not {content_type})"
            return ApiError(400, message, code="invalid_body").response()
        if first.get("type") == "json_invalid":
            at, why = first["loc"][-1], first.get("ctx", {}).get("error", "")
            return ApiError(400, f"invalid JSON at character {at}: {why}", code="invalid_json").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid value')}"
            if param
            else str(first.get("msg", "invalid body"))
        )
        return ApiError(400, message, param=param, code="invalid_parameter").response()

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        if engine is not None and not engine.healthy:
            reason = f"model failed: {engine.error}" if engine.error else "engine is not running"
            return JSONResponse({"status": "error", "detail": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
    async def metrics_route() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
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

    def sampling(body: SamplingBody, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        need_engine()
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
        bias = body.bias()
        outside = [t for t, _ in bias if t >= vocab]
        if outside:
            raise ApiError(
                400,
                f"logit_bias names token {outside[0]}; this model's vocabulary has {vocab} tokens",
                param="logit_bias",
                code="invalid_logit_bias",
            )
        if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
            raise ApiError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs", code="logprobs_required"
            )
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=bias,
            seed=body.seed,
            stop=body.stops(),
            logprobs=body.logprob_count(),
        )
        try:
            params.check()
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        return params

    def choices(prompts: int, n: int) -> None:
        if prompts * n > MAX_SEQUENCES:
            raise ApiError(
                400,
                f"{prompts} prompts x n={n} is {prompts * n} sequences; at most {MAX_SEQUENCES} per request",
                param="n",
                code="too_many_choices",
            )

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**SSE, **GENERATE_ERRORS},
        include_in_schema=engine is not None,
    )
    async def completions(body: CompletionBody, request: Request) -> Response:
        check_model(body.model)
        eng = need_engine()
        prompts = [eng.runner.encode(p) for p in body.prompts()]
        choices(len(prompts), body.n)
        # choice j of prompt i is sequence i * n + j (OpenAI's order), seeded apart by that row
        ids = [x for x in prompts for _ in range(body.n)]
        per_prompt = [sampling(body, len(x), body.max_tokens or 16) for x in prompts]
        params = [per_prompt[row // body.n].for_row(row) for row in range(len(ids))]
        rid = f"cmpl-{uuid.uuid4().hex}"

        def logprobs(entries: Any, text_len: int | None = None) -> dict[str, Any] | None:
            return completion_logprobs(entries, decode, text_len) if body.logprobs is not None else None

        def chunk(text: str, finish: str | None, index: int = 0, lp: Any = None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            }

        if body.stream:
            return stream_events(
                eng,
                ids,
                params,
                retry_after_s,
                usage=wants_usage(body),
                n=body.n,
                first=[],
                delta=lambda i, d: chunk(d.text, None, i, logprobs(d.logprobs)),
                last=lambda i, c, rest: chunk(
                    "", finish_reason(c), i, logprobs(rest, len(c.text)) if rest else None
                ),
            )
        results = await complete(eng, ids, params, request, retry_after_s)
        out = chunk("", None)
        out["choices"] = [
            {
                "index": i,
                "text": c.text,
                "logprobs": logprobs(c.logprobs or [], len(c.text)),
                "finish_reason": finish_reason(c),
            }
            for i, c in enumerate(results)
        ]
        out["usage"] = usage_of(results, body.n)
        return JSONResponse(out)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatResponse,
        responses={**SSE, **GENERATE_ERRORS},
        include_in_schema=engine is not None,
    )
    async def chat(body: ChatBody, request: Request) -> Response:
        check_model(body.model)
        eng = need_engine()
        try:
            ids = eng.runner.encode_chat([m.text() for m in body.messages])
        except Exception as err:  # noqa: BLE001 - no template, or one that refuses these messages
            raise ApiError(
                400, f"the chat template cannot render these messages: {err}", param="messages"
            ) from err
        choices(1, body.n)
        base = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        params = [base.for_row(j) for j in range(body.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs(entries: Any) -> dict[str, Any] | None:
            return chat_logprobs(entries, decode) if body.logprobs else None

        def chunk(delta: dict[str, str], finish: str | None, index: int, lp: Any = None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }

        if body.stream:
            return stream_events(
                eng,
                [ids] * body.n,
                params,
                retry_after_s,
                usage=wants_usage(body),
                n=body.n,
                first=[chunk({"role": "assistant", "content": ""}, None, j) for j in range(body.n)],
                delta=lambda i, d: chunk({"content": d.text}, None, i, logprobs(d.logprobs)),
                last=lambda i, c, rest: chunk({}, finish_reason(c), i, logprobs(rest) if rest else None),
            )
        results = await complete(eng, [ids] * body.n, params, request, retry_after_s)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": j,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs(c.logprobs or []),
                        "finish_reason": finish_reason(c),
                    }
                    for j, c in enumerate(results)
                ],
                "usage": usage_of(results, body.n),
            }
        )

    async def run_encoder(body: EncodeBody, fn: Callable[[list[str]], Any]) -> tuple[list[str], Any]:
        check_model(body.model)
        texts = body.texts()
        async with encoder_lock:
            return texts, await run_in_threadpool(fn, texts)

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingsResponse,
        responses=ENCODE_ERRORS,
        include_in_schema=encoder is not None and not encoder.is_classifier,
    )
    async def embeddings(body: EncodeBody) -> dict[str, Any]:
        if encoder is None or encoder.is_classifier:
            raise ApiError(400, f"'{model_name}' does not serve embeddings", code="unsupported_endpoint")
        texts, vectors = await run_encoder(body, encoder.embed)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        n = encoder.count_tokens(texts)
        return {
            "object": "list",
            "model": model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        }

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ENCODE_ERRORS,
        include_in_schema=encoder is not None and encoder.is_classifier,
    )
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
