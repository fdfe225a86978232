"""Between the asyncio app and the Engine's worker thread: submit, await or stream results, cancel.

One HTTP request may carry several prompts and several choices (`n`) per prompt: each choice is its own engine
request, queued all or none, and they succeed or fail together (a failure cancels the others, so no slot works for
a response nobody will get)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmos_cli.core.serve.engine import Engine, EngineRestarted, EngineUnavailable, QueueFull, Submission
from llmos_cli.core.serve.protocol import ApiError, SamplingBody
from llmos_cli.core.serve.runners import Completion, Delta, SamplingParams, SequenceError, TokenLogprob


def finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def usage_of(results: list[Completion], n: int = 1) -> dict[str, int]:
    """Token counts of a request whose results are `n` choices per prompt: each prompt counts once, every
    choice's completion tokens count."""
    prompt = sum(c.prompt_tokens for c in results[::n])
    gen = sum(len(c.token_ids) for c in results)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen}


def wants_usage(body: SamplingBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _unavailable(message: str, code: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


def failure(err: BaseException, retry_after_s: int) -> ApiError:
    """The HTTP error for a request the engine could not complete."""
    if isinstance(err, EngineRestarted):
        return _unavailable(f"{err}; retry the request", "engine_restarted", retry_after_s)
    if isinstance(err, EngineUnavailable):
        return _unavailable(str(err), "unavailable", max(retry_after_s, 5))
    if isinstance(err, SequenceError):
        return ApiError(500, f"generation failed: {err}", type="server_error", code="generation_error")
    return ApiError(
        500, f"the model failed: {type(err).__name__}: {err}", type="server_error", code="model_error"
    )


def _cancelled(retry_after_s: int) -> ApiError:
    return _unavailable("the request was cancelled: the server is shutting down", "cancelled", retry_after_s)


def _submit_all(
    engine: Engine,
    ids: list[list[int]],
    params: list[SamplingParams],
    *,
    stream: bool,
    retry_after_s: int,
) -> tuple[list[str], asyncio.Queue]:
    """Submit one engine request per sequence; events arrive on one queue as (index, Delta or result)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def putter(index: int) -> Callable[[Any], None]:
        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting for this result
                loop.call_soon_threadsafe(events.put_nowait, (index, item))

        return put

    puts = [putter(i) for i in range(len(ids))]
    items = [
        Submission(x, p, put if stream else None, put) for x, p, put in zip(ids, params, puts, strict=True)
    ]
    try:
        rids = engine.submit_all(items)
    except BaseException as err:
        if isinstance(err, QueueFull):
            raise _unavailable(
                f"the server is busy ({err}); retry shortly", "queue_full", retry_after_s
            ) from err
        if isinstance(err, EngineUnavailable):
            raise failure(err, retry_after_s) from err
        if isinstance(err, ValueError):
            raise ApiError(400, str(err)) from err
        raise
    return rids, events


async def complete(
    engine: Engine,
    ids: list[list[int]],
    params: list[SamplingParams],
    request: Request,
    retry_after_s: int,
) -> list[Completion]:
    """Every prompt's completion; all are cancelled if one fails or the client goes away."""
    rids, events = _submit_all(engine, ids, params, stream=False, retry_after_s=retry_after_s)
    results: dict[int, Completion] = {}
    try:
        while len(results) < len(rids):
            try:
                index, item = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", code="client_closed") from None
                continue
            if isinstance(item, BaseException):
                raise failure(item, retry_after_s)
            if item.finish_reason == "cancelled":
                raise _cancelled(retry_after_s)
            results[index] = item
    finally:
        for rid in rids:
            engine.cancel(rid)  # a no-op for finished requests
    return [results[i] for i in range(len(rids))]


def stream_events(
    engine: Engine,
    ids: list[list[int]],
    params: list[SamplingParams],
    retry_after_s: int,
    *,
    usage: bool,
    n: int = 1,
    first: list[dict],
    delta: Callable[[int, Delta], dict],
    last: Callable[[int, Completion, Sequence[TokenLogprob]], dict],
) -> StreamingResponse:
    """Server-sent events: the `first` chunks, a chunk per text delta (with its tokens' log-probs when asked),
    a final chunk per sequence with its finish_reason (and the log-probs of tokens no delta carried), (usage),
    then [DONE]. A failure sends an error event, then [DONE]."""
    rids, events = _submit_all(engine, ids, params, stream=True, retry_after_s=retry_after_s)

    async def gen() -> AsyncIterator[str]:
        done: dict[int, Completion] = {}
        sent = [0] * len(rids)  # log-probs already streamed, per sequence
        try:
            for chunk in first:
                yield _event(chunk)
            while len(done) < len(rids):
                index, item = await events.get()
                if isinstance(item, Delta):
                    sent[index] += len(item.logprobs)
                    yield _event(delta(index, item))
                    continue
                if isinstance(item, BaseException) or item.finish_reason == "cancelled":
                    err = failure(item, retry_after_s) if isinstance(item, BaseException) else None
                    yield _event((err or _cancelled(retry_after_s)).body())
                    break
                done[index] = item
                yield _event(last(index, item, (item.logprobs or [])[sent[index] :]))
            else:
                if usage:
                    final = last(0, done[0], ())
                    results = [done[i] for i in range(len(rids))]
                    yield _event({**final, "choices": [], "usage": usage_of(results, n)})
            yield "data: [DONE]\n\n"
        finally:
            for rid in rids:
                engine.cancel(rid)  # a no-op once finished; frees the slots when the client disconnects

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
