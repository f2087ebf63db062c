"""Optional bearer-token check, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from steerserve.server.errors import APIError


def check_api_key(request: Request, expected: str | None) -> None:
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.encode())
    if not valid:
        raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                       code="invalid_api_key")
