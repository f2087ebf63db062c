"""Run the app under uvicorn with this server's HTTP bounds and its SIGTERM drain."""

from __future__ import annotations

import threading

import uvicorn
from sse_starlette.sse import AppStatus

from steerserve.server.settings import ServerSettings

MAX_HEADER_BYTES = 64 * 1024  # request line + headers; larger ones are refused by the parser


def uvicorn_config(app, settings: ServerSettings) -> uvicorn.Config:
    """h11 always: its bound on header size holds whichever HTTP libraries are installed
    (uvicorn would pick httptools, which has no such setting, when it is present)."""
    return uvicorn.Config(app, host=settings.host, port=settings.port,
                          log_level=settings.log_level, http="h11", lifespan="on",
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=max(1, round(settings.drain_timeout)))


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or SIGINT) the draining flag goes up first, so requests still arriving on
    open connections get 503 while those in flight finish (up to the drain timeout)."""

    def __init__(self, config: uvicorn.Config, draining: threading.Event) -> None:
        super().__init__(config)
        self.draining = draining
        # sse-starlette ends every stream at SIGTERM by default; here they drain instead, and
        # uvicorn cancels what is left when the drain timeout expires.
        AppStatus.disable_automatic_graceful_drain()

    def handle_exit(self, sig, frame) -> None:
        self.draining.set()
        super().handle_exit(sig, frame)
