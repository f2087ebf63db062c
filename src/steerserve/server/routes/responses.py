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
from steerserve.server.tools.formats import CallReader, Delta, ParsedCall
from steerserve.server.translate.request import Translated, chat_requests


def install(app: FastAPI, ctx: ServingContext) -> None:
    """Registers the Responses API routes."""

    @app.post("/v1/responses")
    async def create(request: Request):
        check_api_key(request, ctx.settings.api_key)
        return await create_response(request, ctx)


def _translate(ctx: ServingContext, chat: ChatCompletionRequest, request_id: str) -> Translated:
    try:
        translated = chat_requests(ctx, chat, request_id)
    except APIError as exc:
        raise as_responses_error(exc) from exc
    method = translated.requests[0].method
    if method.reporting:  # a per-token list has no place in a Responses output item
        raise APIError(400, f"the Responses API cannot carry the per-token '{method.reports}' "
                       "a decoding method reports; use /v1/chat/completions", "decoding")
    return translated


async def create_response(request: Request, ctx: ServingContext):
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body, chat = await ctx.off_loop(parse_responses, raw)
    response_id = f"resp_{uuid.uuid4().hex}"
    translated = await ctx.translate(_translate, ctx, chat, response_id)
    streams = open_streams(ctx, translated.requests)
    shape = Shape(response_id, f"msg_{uuid.uuid4().hex}", int(time.time()), body, chat,
                  translated.decoding)
    prompt_tokens = len(translated.requests[0].prompt_ids)
    reader = translated.call_reader(body.max_tool_calls)
    if body.stream:
        return EventSourceResponse(stream_response(ctx, shape, streams, prompt_tokens, reader),
                                   ping=15)
    results = await collect(ctx, streams, request)
    failed = failed_response(results)
    if failed is not None:
        return failed
    result = results[0]
    status = _status(result.finish_reason)
    if reader is None:
        output = [shape.message(status, result.text)]
    else:
        read = reader.read_all(result.text)
        output = [shape.message(status, read.content)] if read.content else []
        output += [shape.function_call(call, status) for call in read.calls]
    return JSONResponse(shape.response(
        status, output, usage(result.prompt_tokens or prompt_tokens, result.completion_tokens)))


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

    def function_call(self, call: ParsedCall, status: str) -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": call.name,
                "arguments": call.arguments, "status": status}

    def response(self, status: str, output: list[dict] = (), usage_block: dict | None = None,
                 error: dict | None = None) -> dict:
        body, chat = self.body, self.chat
        done = status in ("completed", "incomplete")
        response = {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "model": body.model, "output": list(output),
            "parallel_tool_calls": True if body.parallel_tool_calls is None
            else body.parallel_tool_calls,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": 1.0 if chat.temperature is None else chat.temperature,
            "text": {"format": (body.given("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": _dumped(body.tool_choice) or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": 1.0 if chat.top_p is None else chat.top_p, "truncation": "disabled",
            "usage": usage_block, "user": chat.user, "metadata": chat.metadata or {},
            "completed_at": int(time.time()) if done else None,
        }
        if self.decoding is not None:
            response["decoding"] = self.decoding
        return response


def _dumped(value) -> str | dict | None:
    return value.model_dump() if hasattr(value, "model_dump") else value


class ResponseEvents:
    """One response's event stream: the message item (opened at once without tools, at its
    first text with them) and a function_call item for each call as it completes."""

    def __init__(self, shape: Shape, reader: CallReader | None) -> None:
        self.shape = shape
        self.reader = reader
        self.numbers = itertools.count()
        self.items: list[dict] = []  # finished function_call items, by output index
        self.message_index: int | None = None
        self.text = ""

    def event(self, kind: str, **fields) -> dict:
        data = {"type": kind, "sequence_number": next(self.numbers), **fields}
        return {"event": kind, "data": json.dumps(data, ensure_ascii=False)}

    @property
    def where(self) -> dict:
        return {"item_id": self.shape.item_id, "output_index": self.message_index,
                "content_index": 0}

    def opening(self) -> list[dict]:
        events = [self.event(f"response.{kind}", response=self.shape.response("in_progress"))
                  for kind in ("created", "in_progress")]
        return events + (self.open_message() if self.reader is None else [])

    def open_message(self) -> list[dict]:
        self.message_index = len(self.items)
        self.items.append({})  # the message's place, filled at the end
        return [self.event("response.output_item.added", output_index=self.message_index,
                           item=self.shape.message("in_progress", None)),
                self.event("response.content_part.added", **self.where, part=text_part(""))]

    def add(self, text: str, finished: bool) -> list[dict]:
        read = Delta(text)
        if self.reader is not None:
            read = self.reader.feed(text)
            read = read.merge(self.reader.finish()) if finished else read
        events = []
        if read.content:
            if self.message_index is None:
                events += self.open_message()
            self.text += read.content
            events.append(self.event("response.output_text.delta", **self.where,
                                     delta=read.content, logprobs=[]))
        for call in read.calls:
            events += self.call_events(call)
        return events

    def call_events(self, call: ParsedCall) -> list[dict]:
        index, item = len(self.items), self.shape.function_call(call, "in_progress")
        where = {"item_id": item["id"], "output_index": index}
        self.items.append({**item, "status": "completed"})
        return [self.event("response.output_item.added", output_index=index,
                           item={**item, "arguments": ""}),
                self.event("response.function_call_arguments.delta", **where,
                           delta=call.arguments),
                self.event("response.function_call_arguments.done", **where,
                           arguments=call.arguments),
                self.event("response.output_item.done", output_index=index,
                           item=self.items[index])]

    def closing(self, status: str) -> list[dict]:
        if self.message_index is None:
            return []
        message = self.items[self.message_index] = self.shape.message(status, self.text)
        return [self.event("response.output_text.done", **self.where, text=self.text,
                           logprobs=[]),
                self.event("response.content_part.done", **self.where,
                           part=text_part(self.text)),
                self.event("response.output_item.done", output_index=self.message_index,
                           item=message)]

    def partial_output(self) -> list[dict]:
        """What a failed response had produced."""
        output = [item for item in self.items if item]
        if self.message_index is not None:
            output.insert(self.message_index, self.shape.message("incomplete", self.text))
        return output


async def stream_response(ctx: ServingContext, shape: Shape, streams: list[RequestStream],
                          prompt_tokens: int, reader: CallReader | None
                          ) -> AsyncIterator[dict]:
    events = ResponseEvents(shape, reader)
    for event in events.opening():
        yield event
    finish_reason, output_tokens = None, 0
    async for _, output in run_choices(ctx, streams):
        if output.failure is not None:
            error = {"code": "server_error", "message": output.failure.message}
            yield events.event("error", **error, param=None)
            yield events.event("response.failed", response=shape.response(
                "failed", events.partial_output(), error=error))
            return
        for event in events.add(output.text, output.finished):
            yield event
        if output.finished:
            finish_reason = output.finish_reason.value if output.finish_reason else None
            output_tokens = output.completion_tokens
            prompt_tokens = output.prompt_tokens or prompt_tokens
    status = _status(finish_reason)
    for event in events.closing(status):
        yield event
    yield events.event(f"response.{status}", response=shape.response(
        status, [item for item in events.items if item], usage(prompt_tokens, output_tokens)))
