"""Between the asyncio app and the Engine's worker thread: submit, await or stream a result, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmos_cli.core.batching import Engine, EngineUnavailable, QueueFull
from llmos_cli.core.infer import Completion, SamplingParams
from llmos_cli.core.server.schema import ApiError, SamplingBody


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def usage_of(results: list[Completion]) -> dict[str, int]:
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


async def complete(
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


def wants_usage(body: SamplingBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def stream_events(
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
                        yield f"data: {json.dumps({**final, 'choices': [], 'usage': usage_of([item])})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            engine.cancel(rid)  # a no-op once finished; frees the slot when the client disconnects

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
