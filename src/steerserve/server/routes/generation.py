"""The flow /v1/chat/completions and /v1/completions share: parse, translate and admit a body,
then stream its choices as SSE chunks or answer with them whole. Each route supplies only
its shapes (body schema, id prefix, chunks, whole response)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from steerserve.decoding.engine import RequestStream
from steerserve.decoding.request import RequestOutput
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext
from steerserve.server.errors import error_payload
from steerserve.server.formatting import ResponseMeta, finite_temperatures, new_id, usage
from steerserve.server.routes.choices import (
    ChoiceResult,
    collect,
    failed_response,
    open_streams,
    run_choices,
)
from steerserve.server.schemas.requests import SamplingFields
from steerserve.server.translate.request import Translated

Body = TypeVar("Body", bound=SamplingFields)


@dataclass(frozen=True)
class Call(Generic[Body]):
    """One admitted request: what its chunks and whole response are shaped from."""

    body: Body
    translated: Translated
    streams: list[RequestStream]
    meta: ResponseMeta

    @property
    def include_usage(self) -> bool:
        options = self.body.stream_options
        return bool(options and options.include_usage)


@dataclass(frozen=True)
class Route(Generic[Body]):
    """What a generation route adds to the shared flow."""

    schema: type[Body]
    id_prefix: str
    translate: Callable[[ServingContext, Body, str], Translated]
    events: Callable[[ServingContext, Call[Body]], AsyncIterator[str]]
    whole: Callable[[Call[Body], list[ChoiceResult]], dict]


async def respond(request: Request, ctx: ServingContext, route: Route[Body]) -> Response:
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body = await ctx.off_loop(parse_body, raw, route.schema)
    meta_id = new_id(route.id_prefix)
    translated = await ctx.translate(route.translate, ctx, body, meta_id)
    streams = open_streams(ctx, translated.requests)
    meta = ResponseMeta(meta_id, int(time.time()), body.model, translated.decoding)
    call = Call(body, translated, streams, meta)
    if body.stream:
        return EventSourceResponse(route.events(ctx, call), ping=15)
    results = await collect(ctx, streams, request)
    failed = failed_response(results)
    if failed is not None:
        return failed
    return JSONResponse(route.whole(call, results))


def ending(finish_reason: str | None, temperatures: Iterable[float] | None) -> dict:
    """A choice's closing fields; temperatures only when the body asked for them (None)."""
    if temperatures is None:
        return {"finish_reason": finish_reason}
    return {"finish_reason": finish_reason, "temperatures": finite_temperatures(temperatures)}


def output_ending(output: RequestOutput, temperatures: bool) -> dict:
    return {**ending(output.finish_reason.value if output.finished else None,
                     output.temperatures if temperatures else None),
            **method_report(output.reports, output.method_values)}


def method_report(name: str | None, values: Iterable[float]) -> dict:
    """A decoding method's per-token numbers under its field (Co-LLM's `deferrals`); whole
    numbers as integers."""
    if name is None:
        return {}
    return {name: [int(v) if float(v).is_integer() else v for v in values]}


def whole_response(meta: ResponseMeta, object_name: str, choices: list[dict],
                   prompt_tokens: int, results: list[ChoiceResult]) -> dict:
    body = meta.envelope(object_name, choices)
    body["usage"] = usage(prompt_tokens, sum(r.completion_tokens for r in results))
    return body


def _chunk(meta: ResponseMeta, object_name: str, choices: list[dict],
           usage_block: dict | None = None) -> str:
    body = meta.envelope(object_name, choices)
    if usage_block is not None:
        body["usage"] = usage_block
    return json.dumps(body, ensure_ascii=False)


async def stream_choices(ctx: ServingContext, call: Call, object_name: str,
                         opening: Iterable[dict],
                         delta: Callable[[int, RequestOutput], dict | None],
                         prompt_tokens: int) -> AsyncIterator[str]:
    """SSE data: a chunk per opening choice, then one per output `delta` keeps (None skips
    it), the usage chunk if asked for, and [DONE]. An engine failure ends the stream with an
    error event and no usage."""
    for choice in opening:
        yield _chunk(call.meta, object_name, [choice])
    completion_tokens = 0
    async for index, output in run_choices(ctx, call.streams):
        if output.failure is not None:
            yield json.dumps(error_payload(output.failure.status, output.failure.message))
            break
        choice = delta(index, output)
        if choice is not None:
            yield _chunk(call.meta, object_name, [choice])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if call.include_usage:
            yield _chunk(call.meta, object_name, [], usage(prompt_tokens, completion_tokens))
    yield "[DONE]"
