"""Graceful shutdown. On SIGTERM the server stops admitting (every /v1/ request is a 503 with `Retry-After`,
`/health` a 503 `{"status": "draining"}`, so a load balancer takes the replica out), lets the requests in flight
finish for up to `drain_timeout` seconds, then stops uvicorn (requests still running after that fail) and the
process exits 0. A second SIGTERM, or SIGINT, stops at once.

    SIGTERM ─> Drain.begin() ─> wait until Drain.num_in_flight == 0 or drain_timeout ─> should_exit ─> exit 0
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn

from server.errors import APIError
from server.middleware import is_inference

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5                # what a refused client is told to wait (another replica will answer it)
CANCEL_AFTER_S = 0.5             # after the drain timeout, uvicorn's wait for connections before cancelling them


class Drain:
    """Counts /v1/ requests in flight (streams until their last byte); after `begin()` refuses new ones."""

    def __init__(self):
        self._cond = threading.Condition()
        self.is_draining = False
        self.num_in_flight = 0

    def begin(self) -> None:
        with self._cond:
            self.is_draining = True

    def enter(self) -> bool:
        """Whether a new request may start (and is now counted)."""
        with self._cond:
            if self.is_draining:
                return False
            self.num_in_flight += 1
            return True

    def exit(self) -> None:
        with self._cond:
            self.num_in_flight -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every counted request finished within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self.num_in_flight == 0, timeout)


class DrainGate:
    """ASGI middleware: /v1/ and LoRAX requests are counted by `drain`, and refused with a 503 once it is draining."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_inference(scope["path"]):
            return await self.app(scope, receive, send)
        if not self.drain.enter():
            error = APIError(503, "server is shutting down; retry on another replica", code="shutting_down",
                             retry_after=RETRY_AFTER_S)
            return await error.response()(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.exit()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains (see the module docstring) instead of stopping at once, and
    which does not re-raise the signal after shutting down (uvicorn's default), so the process exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.drain.is_draining and not self.should_exit:
            self.drain.begin()
            log.info("SIGTERM: draining %d requests in flight (up to %gs); new requests get 503",
                     self.drain.num_in_flight, self.drain_timeout)
            threading.Thread(target=self._exit_when_drained, name="peftserve-drain", daemon=True).start()
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    def _exit_when_drained(self) -> None:
        start = time.monotonic()
        if self.drain.wait_idle(self.drain_timeout):
            log.info("drained in %.1fs; shutting down", time.monotonic() - start)
        else:
            log.warning("drain timeout (%gs): %d requests still in flight are cancelled", self.drain_timeout,
                        self.drain.num_in_flight)
        self.should_exit = True


def run_server(app, *, host: str, port: int, log_level: str, drain: Drain, drain_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=CANCEL_AFTER_S)
    DrainingServer(config, drain, drain_timeout).run()
