"""Read a bounded JSON body and validate it into a request model, with OpenAI errors.

Bodies must say they are JSON: a web page can send `text/plain` (or form) POSTs to any
origin without a CORS preflight, so accepting them would let any page drive the server.
Valid JSON can still be hostile: lone UTF-16 surrogates (which no tokenizer can encode) and
nesting deep enough to exhaust the parser's recursion are 400s, never 500s.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from steerserve.server.errors import APIError, validation_error

Model = TypeVar("Model", bound=BaseModel)
MAX_DEPTH = 32  # arrays and objects inside each other; the deepest real body here is ~6


async def read_body(request: Request, limit: int) -> bytes:
    require_json(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/")
                                            and media.endswith("+json")):
        raise APIError(415, "the request body must be JSON (Content-Type: application/json)",
                       code="unsupported_media_type")


def decode_json(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, "request body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise APIError(400, f"request body nests deeper than {MAX_DEPTH} levels") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_values(data)
    return data


def check_values(data: Any) -> None:
    """Depth and lone surrogates, iteratively (a recursive walk could itself overflow)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_DEPTH} levels",
                           path or None)
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, "strings must be valid Unicode: a lone surrogate "
                       f"(\\u{ord(text[exc.start]):04x}) cannot be encoded", path or None) from exc


def parse_body(raw: bytes, model: type[Model]) -> Model:
    data = decode_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


async def parse_request(request: Request, model: type[Model], limit: int) -> Model:
    return parse_body(await read_body(request, limit), model)
