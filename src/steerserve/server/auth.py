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


def check_admin_key(request: Request, settings) -> None:
    """Admin routes (adapters, vector writes): the admin key when one is set, else the API
    key (if any)."""
    if settings.admin_key is None:
        check_api_key(request, settings.api_key)
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), settings.admin_key.encode())):
        raise APIError(401, "this is an admin route: it needs the admin key "
                       "(Authorization: Bearer <admin key>)", code="invalid_admin_key")
