"""A real server in this process: uvicorn on 127.0.0.1 in a thread, serving an app built from a
ServingContext the test made (its own method registry, models built in the test). Real HTTP;
the test can reach the engine to inject a fault."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx

from steerserve.server.app import create_app
from steerserve.server.context import ServingContext
from steerserve.server.serving import DrainingServer, uvicorn_config
from tests.support import free_port


class InProcessServer:
    def __init__(self, ctx: ServingContext, timeout: float = 30) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        settings = dataclasses.replace(ctx.settings, port=self.port, log_level="warning")
        self.server = DrainingServer(uvicorn_config(create_app(ctx), settings), ctx.draining)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)

    @property
    def engine(self):
        """The engine behind the façade: tests inject faults there; the server never does."""
        return self.ctx.engine._engine

    def post(self, path: str, body: dict, timeout: float = 60) -> httpx.Response:
        return httpx.post(f"{self.base_url}{path}", json=body, timeout=timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
