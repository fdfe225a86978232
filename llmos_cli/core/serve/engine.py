"""Continuous batching for serving: a bounded request queue and one generation thread.

Requests join the running `DecodeBatch` between decode steps and leave it as soon as they finish or are
cancelled, so a long request does not hold short ones back. Results are delivered through callbacks called on the
engine thread; the server forwards them to its event loop.

Failures stay as small as they can: a sequence whose logits, sampling or text fail finishes alone with its
`SequenceError`; prompts the model fails on fail alone when the model still runs; and when the decode loop itself
raises, the requests in flight get `EngineRestarted` and the loop starts again on a fresh batch. The engine gives up
(`error` set, `healthy` false) only when the model cannot run a one-token forward pass any more.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos_cli.core.serve.runners import (
    Completion,
    DecodeBatch,
    Delta,
    GenSequence,
    PrefillError,
    Runner,
    SamplingParams,
    Seq2SeqBatch,
)

PROBE_BACKOFF_S = (0.0, 0.1, 0.5)  # waits before each attempt to run the model after a failure


class QueueFull(Exception):
    """The request queue is at its limit; retry later."""


class EngineUnavailable(Exception):
    """The engine is shutting down, or the model failed and the engine stopped."""


class EngineRestarted(Exception):
    """The decode loop failed and was restarted; this request was in flight and is dropped: retry it."""


class ModelDown(Exception):
    """The model cannot run a forward pass: the engine stops."""


@dataclass
class Submission:
    """What `Engine.submit_all` queues: a prompt, how to sample it and where its results go."""

    prompt_ids: list[int]
    params: SamplingParams
    on_delta: Callable[[Delta], None] | None
    on_finish: Callable[[Completion | BaseException], None]


@dataclass
class Request:
    id: str
    seq: GenSequence
    on_finish: Callable[[Completion | BaseException], None]
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


@dataclass
class EngineStats:
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    restarts: int = 0


class Engine:
    """Serve generation requests from a bounded queue with continuous batching on one background thread.

    `max_queue` bounds the requests waiting for a slot (an HTTP request with several prompts or `n` choices is one
    engine request per sequence); those that get one of the `max_batch_size` slots at once do not count against it."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        on_first_token: Callable[[float], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.runner, self.max_batch_size, self.max_queue = runner, max_batch_size, max_queue
        self.on_first_token = on_first_token
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._queue: deque[Request] = deque()
        self._active: dict[str, Request] = {}
        self._cancels: set[str] = set()
        self._cv = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._drain_deadline = math.inf
        self._thread: threading.Thread | None = None

    # ---- client side (any thread) ----

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return max(0, len(self._queue) - (self.max_batch_size - len(self._active)))

    @property
    def running(self) -> int:
        """Slots in use: requests admitted to the decode batch and not yet delivered."""
        return len(self._active)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        with self._cv:
            if self._thread is None:
                self._accepting = True
                self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
                self._thread.start()
        return self

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        on_delta: Callable[[Delta], None] | None = None,
        on_finish: Callable[[Completion | BaseException], None],
    ) -> str:
        """Queue a request and return its id. Raises QueueFull, EngineUnavailable or ValueError (bad params)."""
        return self.submit_all([Submission(prompt_ids, params, on_delta, on_finish)])[0]

    def submit_all(self, items: list[Submission]) -> list[str]:
        """Queue several requests (one HTTP request's prompts and choices) all or none: each is a sequence
        of its own and counts against `max_queue`. Raises as `submit` does, queueing nothing."""
        for item in items:
            item.params.check()
        with self._cv:
            if not self._accepting:
                raise EngineUnavailable(
                    f"the model failed: {self.error}" if self.error else "the server is shutting down"
                )
            if len(self._queue) + len(items) - (self.max_batch_size - len(self._active)) > self.max_queue:
                raise QueueFull(
                    f"{self.queue_depth} requests are already waiting"
                    + (f" and this one adds {len(items)} sequences" if len(items) > 1 else "")
                )
            reqs = [
                Request(
                    uuid.uuid4().hex, self.runner.sequence(i.prompt_ids, i.params, i.on_delta), i.on_finish
                )
                for i in items
            ]
            self._queue.extend(reqs)
            self._cv.notify()
        return [r.id for r in reqs]

    def cancel(self, request_id: str) -> None:
        """Stop a queued or running request; its slot is freed before the next decode step."""
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to `timeout` seconds, cancel the rest."""
        with self._cv:
            self._accepting = False
            self._drain_deadline = min(self._drain_deadline, time.monotonic() + timeout)
            while (self._queue or self._active) and self._thread and self._thread.is_alive():
                left = self._drain_deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def hurry(self) -> None:
        """End the grace period of a `stop` (running or to come) now: what is still in flight is cancelled."""
        with self._cv:
            self._accepting = False
            self._drain_deadline = time.monotonic()
            self._cv.notify_all()

    # ---- engine thread ----

    def _run(self) -> None:
        """The engine thread: the decode loop, started again on a fresh batch whenever it raises."""
        while True:
            try:
                self._loop(self._new_batch())
                return
            except ModelDown as err:
                self._fail_all(err.__cause__ or err)
                return
            except Exception as err:  # noqa: BLE001 - restart; requests in flight are answered, not lost
                self._restart(err)
                if not self._model_runs():
                    self._fail_all(err)
                    return

    def _loop(self, batch: DecodeBatch | Seq2SeqBatch) -> None:
        while True:
            admit = self._next_admissions(batch)
            if admit is None:
                return
            batch.drop_finished()  # cancelled requests leave before the next step
            if admit:
                self._prefill(batch, admit)
            else:
                batch.step()
            self.stats.steps += 1
            finished = batch.drop_finished()
            if finished:
                self._finish(finished)

    def _prefill(self, batch: DecodeBatch | Seq2SeqBatch, admit: list[Request]) -> None:
        """Add admitted requests; if the model fails on them but still runs, only they fail."""
        try:
            batch.add([r.seq for r in admit])
        except PrefillError as err:
            if not self._model_runs():
                raise ModelDown(str(err)) from err
            with self._cv:
                for r in admit:
                    self._active.pop(r.id, None)
                self.stats.requests_failed += len(admit)
                self._cv.notify_all()
            for r in admit:
                self._deliver(r, err)
            return
        now = time.monotonic()
        for r in admit:
            r.first_token_at = now
            if self.on_first_token is not None:
                self.on_first_token(now - r.submitted_at)

    def _new_batch(self) -> DecodeBatch | Seq2SeqBatch:
        return self.runner.new_batch()

    def _model_runs(self) -> bool:
        """Whether the model still generates a token for a one-token prompt (a few tries, backing off)."""
        for wait in PROBE_BACKOFF_S:
            time.sleep(wait)
            probe = self.runner.sequence([self.runner.pad_id], SamplingParams(max_new_tokens=1))
            try:
                self._new_batch().add([probe])
                return True
            except Exception:  # noqa: BLE001, S112 - a failed probe is the answer
                continue
        return False

    def _next_admissions(self, batch: DecodeBatch | Seq2SeqBatch) -> list[Request] | None:
        """Apply cancellations and pick queued requests for free slots; None when the engine should exit."""
        with self._cv:
            while not batch.seqs and not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                for r in list(self._queue) + list(self._active.values()):
                    r.seq.cancel()
                self._flush_cancelled()
                return None
            for rid in self._cancels:
                req = self._active.get(rid)
                if req is not None:
                    req.seq.cancel()
            for r in self._queue:
                if r.id in self._cancels:
                    r.seq.cancel()
            self._cancels.clear()
            self._flush_cancelled()
            admit: list[Request] = []
            while self._queue and len(batch) + len(admit) < self.max_batch_size:
                req = self._queue.popleft()
                self._active[req.id] = req
                admit.append(req)
            return admit

    def _flush_cancelled(self) -> None:
        """Deliver cancelled queued requests now; running ones leave at the next drop_finished."""
        keep: deque[Request] = deque()
        for r in self._queue:
            if r.seq.finished:
                self.stats.requests_cancelled += 1
                self._deliver(r, r.seq.completion())
            else:
                keep.append(r)
        self._queue = keep
        for rid, r in list(self._active.items()):
            if r.seq.finished and r.seq.finish_reason == "cancelled":
                del self._active[rid]
                self.stats.requests_cancelled += 1
                self._deliver(r, r.seq.completion())
        self._cv.notify_all()

    def _finish(self, seqs: list[GenSequence]) -> None:
        with self._cv:
            done = {id(s) for s in seqs}
            for rid, r in list(self._active.items()):
                if id(r.seq) not in done:
                    continue
                del self._active[rid]
                if r.seq.error is not None:
                    self.stats.requests_failed += 1
                    self._deliver(r, r.seq.error)
                    continue
                self.stats.requests_finished += 1
                self.stats.prompt_tokens += len(r.seq.prompt_ids)
                self.stats.generated_tokens += len(r.seq.output_ids)
                self._deliver(r, r.seq.completion())
            self._cv.notify_all()

    def _restart(self, err: BaseException) -> None:
        """The loop raised: answer the requests in flight with EngineRestarted (queued ones stay queued)."""
        with self._cv:
            dropped = list(self._active.values())
            self._active.clear()
            self.stats.restarts += 1
            self.stats.requests_failed += len(dropped)
            self._cv.notify_all()
        failure = EngineRestarted(f"the engine restarted after {type(err).__name__}: {err}")
        for r in dropped:
            self._deliver(r, failure)

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            self.error = err
            self._accepting = False
            failed = list(self._queue) + list(self._active.values())
            self._queue.clear()
            self._active.clear()
            self.stats.requests_failed += len(failed)
            self._cv.notify_all()
        failure = EngineUnavailable(f"the model failed: {type(err).__name__}: {err}")
        for r in failed:
            self._deliver(r, failure)

    @staticmethod
    def _deliver(req: Request, result: Completion | BaseException) -> None:
        with contextlib.suppress(Exception):  # a caller's callback must not stop the engine
            req.on_finish(result)
