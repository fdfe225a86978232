"""Running the app under uvicorn: a deadline for request headers, and a shutdown that drains, then exits 0.

uvicorn bounds header size (h11_max_incomplete_event_size), idle keep-alive connections and concurrent
connections itself; what it lacks is a deadline for a request that never finishes arriving (the body's is the
Guard's) and a second signal that ends the grace period at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers have not arrived within
    `timeout_s` of connecting (or of the previous response): a slow client holds no connection for long."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request has started since
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class GracefulServer(uvicorn.Server):
    """SIGTERM or SIGINT: stop accepting, let in-flight requests finish within the grace period, exit 0.
    A second signal ends the grace period now (`on_force` cancels what the engine still runs)."""

    def __init__(self, config: uvicorn.Config, on_force: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_force = on_force

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise them after the shutdown (exit -SIGTERM).
        if self.should_exit:
            self.force_exit = True
            if self.on_force is not None:
                self.on_force()
        else:
            self.should_exit = True
