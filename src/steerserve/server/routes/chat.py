"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from steerserve.decoding.engine import RequestStream
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext
from steerserve.server.errors import error_payload
from steerserve.server.formatting import (
    ResponseMeta,
    chat_logprobs,
    finite_temperatures,
    new_id,
    usage,
)
from steerserve.server.routes.choices import (
    ChoiceResult,
    collect,
    failed_response,
    open_streams,
    run_choices,
)
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.translate.request import chat_requests

CHUNK = "chat.completion.chunk"


async def chat_completions(request: Request, ctx: ServingContext):
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body = await ctx.off_loop(parse_body, raw, ChatCompletionRequest)
    meta_id = new_id("chatcmpl")
    translated = await ctx.off_loop(chat_requests, ctx, body, meta_id)
    streams = open_streams(ctx, translated.requests)
    meta = ResponseMeta(meta_id, int(time.time()), body.model, translated.decoding)
    prompt_tokens = len(translated.requests[0].prompt_ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_chat(ctx, meta, streams, prompt_tokens, include_usage, body.logprobs,
                             body.return_temperatures)
        return EventSourceResponse(events, ping=15)
    results = await collect(ctx, streams, request)
    failed = failed_response(results)
    if failed is not None:
        return failed
    return JSONResponse(chat_response(meta, results, body.logprobs, body.return_temperatures))


def chat_response(meta: ResponseMeta, results: list[ChoiceResult], logprobs: bool,
                  temperatures: bool = False) -> dict:
    choices = [{
        "index": r.index,
        "message": {"role": "assistant", "content": r.text},
        "logprobs": chat_logprobs(r.logprobs) if logprobs else None,
        "finish_reason": r.finish_reason,
        **({"temperatures": finite_temperatures(r.temperatures)} if temperatures else {}),
    } for r in results]
    body = meta.envelope("chat.completion", choices)
    body["usage"] = usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
    return body


def _chunk(meta: ResponseMeta, choices: list[dict], usage_block: dict | None = None) -> str:
    body = meta.envelope(CHUNK, choices)
    if usage_block is not None:
        body["usage"] = usage_block
    return json.dumps(body, ensure_ascii=False)


async def stream_chat(ctx: ServingContext, meta: ResponseMeta, streams: list[RequestStream],
                      prompt_tokens: int, include_usage: bool, logprobs: bool,
                      temperatures: bool = False) -> AsyncIterator[str]:
    for index in range(len(streams)):  # role first, once per choice
        yield _chunk(meta, [{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
    completion_tokens = 0
    async for index, output in run_choices(ctx, streams):
        if output.failure is not None:
            yield json.dumps(error_payload(output.failure.status, output.failure.message))
            break
        if not (output.text or output.finished or (logprobs and output.logprobs)
                or output.temperatures):
            continue
        yield _chunk(meta, [{
            "index": index, "delta": {"content": output.text} if output.text else {},
            "logprobs": chat_logprobs(output.logprobs) if logprobs else None,
            "finish_reason": output.finish_reason.value if output.finished else None,
            **({"temperatures": finite_temperatures(output.temperatures)} if temperatures
               else {})}])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if include_usage:
            yield _chunk(meta, [], usage(prompt_tokens, completion_tokens))
    yield "[DONE]"
