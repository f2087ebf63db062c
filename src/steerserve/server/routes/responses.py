"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat path.

A Responses body becomes a chat body (server/schemas/responses.py), which is translated,
admitted and run exactly as /v1/chat/completions runs it; only the output is shaped
differently: a `response` object, or its typed event stream. Generation stopped by the
length limit is `status: "incomplete"` with reason `max_output_tokens`. A request that fails
in the engine is a non-2xx error; a stream that fails after it started sends an `error`
event and then `response.failed`.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from steerserve.decoding.engine import RequestStream
from steerserve.server.auth import check_api_key
from steerserve.server.body import read_body
from steerserve.server.context import ServingContext
from steerserve.server.errors import APIError
from steerserve.server.routes.choices import collect, failed_response, open_streams, run_choices
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.schemas.responses import (
    ResponsesRequest,
    as_responses_error,
    parse_responses,
)
from steerserve.server.translate.request import Translated, chat_requests


def install(app: FastAPI, ctx: ServingContext) -> None:
    """Registers the Responses API routes."""

    @app.post("/v1/responses")
    async def create(request: Request):
        check_api_key(request, ctx.settings.api_key)
        return await create_response(request, ctx)


def _translate(ctx: ServingContext, chat: ChatCompletionRequest, request_id: str) -> Translated:
    try:
        return chat_requests(ctx, chat, request_id)
    except APIError as exc:
        raise as_responses_error(exc) from exc


async def create_response(request: Request, ctx: ServingContext):
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body, chat = await ctx.off_loop(parse_responses, raw)
    response_id = f"resp_{uuid.uuid4().hex}"
    translated = await ctx.off_loop(_translate, ctx, chat, response_id)
    streams = open_streams(ctx, translated.requests)
    shape = Shape(response_id, f"msg_{uuid.uuid4().hex}", int(time.time()), body, chat,
                  translated.decoding)
    prompt_tokens = len(translated.requests[0].prompt_ids)
    if body.stream:
        return EventSourceResponse(stream_response(ctx, shape, streams, prompt_tokens), ping=15)
    results = await collect(ctx, streams, request)
    failed = failed_response(results)
    if failed is not None:
        return failed
    result = results[0]
    return JSONResponse(shape.response(
        _status(result.finish_reason), result.text,
        usage(result.prompt_tokens or prompt_tokens, result.completion_tokens)))


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass(frozen=True)
class Shape:
    """What every object and event of one response repeats."""

    id: str
    item_id: str
    created_at: int
    body: ResponsesRequest
    chat: ChatCompletionRequest
    decoding: dict | None = None  # the multi-lane method used, reported back as in chat

    def message(self, status: str, text: str | None) -> dict:
        """The one output item; no content part yet while text is None."""
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if text is None else [text_part(text)]}

    def response(self, status: str, text: str | None = None, usage_block: dict | None = None,
                 error: dict | None = None) -> dict:
        body, chat = self.body, self.chat
        done = status in ("completed", "incomplete")
        item_status = "in_progress" if status == "in_progress" else status
        output = [] if text is None else [self.message(
            "incomplete" if item_status == "failed" else item_status, text)]
        response = {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "model": body.model, "output": output,
            "parallel_tool_calls": True if body.parallel_tool_calls is None
            else body.parallel_tool_calls,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": 1.0 if chat.temperature is None else chat.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": body.given("tool_choice") or "auto", "tools": [],
            "top_p": 1.0 if chat.top_p is None else chat.top_p, "truncation": "disabled",
            "usage": usage_block, "user": chat.user, "metadata": chat.metadata or {},
            "completed_at": int(time.time()) if done else None,
        }
        if self.decoding is not None:
            response["decoding"] = self.decoding
        return response


async def stream_response(ctx: ServingContext, shape: Shape, streams: list[RequestStream],
                          prompt_tokens: int) -> AsyncIterator[dict]:
    numbers = itertools.count()

    def event(kind: str, **fields) -> dict:
        data = {"type": kind, "sequence_number": next(numbers), **fields}
        return {"event": kind, "data": json.dumps(data, ensure_ascii=False)}

    where = {"item_id": shape.item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response("in_progress"))
    yield event("response.in_progress", response=shape.response("in_progress"))
    yield event("response.output_item.added", output_index=0,
                item=shape.message("in_progress", None))
    yield event("response.content_part.added", **where, part=text_part(""))
    text, finish_reason, output_tokens = "", None, 0
    async for _, output in run_choices(ctx, streams):
        if output.failure is not None:
            error = {"code": "server_error", "message": output.failure.message}
            yield event("error", **error, param=None)
            yield event("response.failed", response=shape.response("failed", text,
                                                                   error=error))
            return
        if output.text:
            text += output.text
            yield event("response.output_text.delta", **where, delta=output.text, logprobs=[])
        if output.finished:
            finish_reason = output.finish_reason.value if output.finish_reason else None
            output_tokens = output.completion_tokens
            prompt_tokens = output.prompt_tokens or prompt_tokens
    status = _status(finish_reason)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=text_part(text))
    yield event("response.output_item.done", output_index=0, item=shape.message(status, text))
    yield event(f"response.{status}", response=shape.response(
        status, text, usage(prompt_tokens, output_tokens)))
