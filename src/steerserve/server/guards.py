"""What keeps web pages and shutdowns from hurting the server: a Host check on loopback binds
(DNS rebinding), opt-in CORS, and 503s while a SIGTERM drains the requests in flight."""

from __future__ import annotations

import json
import threading

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from steerserve.server.errors import error_payload
from steerserve.server.serving import MAX_HEADER_BYTES
from steerserve.server.settings import LOOPBACK_HOSTS, ServerSettings


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_payload(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _host_name(value: str) -> str:
    """The Host header without its port ('[::1]:8000' -> '::1')."""
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """A page on evil.example whose name is re-pointed at 127.0.0.1 reaches a loopback server
    with `Host: evil.example`: on loopback binds only loopback names (and --allowed-hosts)
    are served."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {name.lower() for name in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = _host_name(headers.get(b"host", b"").decode("latin-1")).lower()
            if host not in self.allowed:
                await _send_error(send, 400, f"Host '{host[:64]}' is not served here (DNS "
                                  "rebinding protection; see --allowed-hosts)", "invalid_host")
                return
        await self.app(scope, receive, send)


class HeaderBound:
    """The HTTP parser refuses oversized headers only while they are incomplete: headers that
    arrive in one read can pass it. Whatever got through is measured here (431)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
            if size > self.limit:
                await _send_error(send, 431, f"request headers exceed {self.limit} bytes",
                                  "headers_too_large")
                return
        await self.app(scope, receive, send)


class Draining:
    """Set on SIGTERM: requests in flight finish, new ones get 503 (and /health says so)."""

    def __init__(self, app: ASGIApp, flag: threading.Event) -> None:
        self.app = app
        self.flag = flag

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.flag.is_set():
            await _send_error(send, 503, "the server is shutting down", "draining")
            return
        await self.app(scope, receive, send)


class CountRequests:
    """HTTP requests by route and status. Pure ASGI (a BaseHTTPMiddleware would hide a
    client's disconnect from the route, which must abort a non-streamed request)."""

    def __init__(self, app: ASGIApp, counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def recording(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route, str(status[0])).inc()


def install(app: FastAPI, settings: ServerSettings, draining: threading.Event,
            counter) -> None:
    """Guards around the app, outermost last: header size, Host check, draining, CORS, with
    the request counter innermost."""
    app.add_middleware(CountRequests, counter=counter)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(Draining, flag=draining)
    if settings.loopback and "*" not in settings.allowed_hosts:
        app.add_middleware(HostCheck, allowed=(*LOOPBACK_HOSTS, *settings.allowed_hosts))
    app.add_middleware(HeaderBound, limit=MAX_HEADER_BYTES)
