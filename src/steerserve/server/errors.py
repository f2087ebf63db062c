"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 431: "invalid_request_error", 500: "internal_server_error",
          503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_payload(status: int, message: str, param: str | None = None,
                  code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, message, param, code), status_code=status)


def _location(loc: tuple) -> str | None:
    """Field path from a pydantic location, without the names pydantic gives union members
    (`values.list[constrained-float].0` is the field `values.0`)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and "[" in p)]
    return ".".join(parts) if parts else None


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, with the field it concerns as `param`."""
    first = exc.errors()[0]
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param, "unknown_field")
    message = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {message}" if param else message, param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal server error")
