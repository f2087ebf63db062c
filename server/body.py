"""Read a bounded JSON body and validate it into a request model, with OpenAI errors."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from steerserve.server.errors import APIError, validation_error

Model = TypeVar("Model", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
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


def decode_json(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, "request body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


async def parse_request(request: Request, model: type[Model], limit: int) -> Model:
    data = decode_json(await read_body(request, limit))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc
