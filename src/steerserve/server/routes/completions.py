"""POST /v1/completions (text or token-id prompts; echo + logprobs for scoring)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from steerserve.decoding.engine import RequestStream
from steerserve.decoding.request import EngineRequest
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext
from steerserve.server.errors import error_payload
from steerserve.server.formatting import (
    ResponseMeta,
    finite_temperatures,
    legacy_logprobs,
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
from steerserve.server.schemas.requests import CompletionRequest
from steerserve.server.translate.request import Translated, completion_requests


async def completions(request: Request, ctx: ServingContext):
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body = await ctx.off_loop(parse_body, raw, CompletionRequest)
    meta_id = new_id("cmpl")
    translated = await ctx.off_loop(completion_requests, ctx, body, meta_id)
    streams = open_streams(ctx, translated.requests)
    meta = ResponseMeta(meta_id, int(time.time()), body.model, translated.decoding)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_completion(ctx, body, meta, translated, streams, include_usage)
        return EventSourceResponse(events, ping=15)
    results = await collect(ctx, streams, request)
    failed = failed_response(results)
    if failed is not None:
        return failed
    return JSONResponse(completion_response(body, meta, translated, results))


def _prompt_text(translated: Translated, request: EngineRequest) -> str:
    return translated.served.info.tokenizer.decode(request.prompt_ids)


def _prompt_tokens(body: CompletionRequest, translated: Translated) -> int:
    return sum(len(r.prompt_ids) for r in translated.requests[:: body.n])


def completion_response(body: CompletionRequest, meta: ResponseMeta, translated: Translated,
                        results: list[ChoiceResult]) -> dict:
    choices = []
    for request, result in zip(translated.requests, results, strict=True):
        prefix = _prompt_text(translated, request) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(list(result.prompt_logprobs or ()) + result.logprobs)
        choices.append({"index": result.index, "text": prefix + result.text,
                        "logprobs": logprobs, "finish_reason": result.finish_reason})
        if body.return_temperatures:
            choices[-1]["temperatures"] = finite_temperatures(result.temperatures)
    envelope = meta.envelope("text_completion", choices)
    envelope["usage"] = usage(_prompt_tokens(body, translated),
                              sum(r.completion_tokens for r in results))
    return envelope


def _chunk(meta: ResponseMeta, choices: list[dict], usage_block: dict | None = None) -> str:
    envelope = meta.envelope("text_completion", choices)
    if usage_block is not None:
        envelope["usage"] = usage_block
    return json.dumps(envelope, ensure_ascii=False)


async def stream_completion(ctx: ServingContext, body: CompletionRequest, meta: ResponseMeta,
                            translated: Translated, streams: list[RequestStream],
                            include_usage: bool) -> AsyncIterator[str]:
    if body.echo:
        for index, request in enumerate(translated.requests):
            yield _chunk(meta, [{"index": index, "text": _prompt_text(translated, request),
                                 "logprobs": None, "finish_reason": None}])
    completion_tokens = 0
    async for index, output in run_choices(ctx, streams):
        if output.failure is not None:
            yield json.dumps(error_payload(output.failure.status, output.failure.message))
            break
        if not (output.text or output.finished or output.logprobs or output.temperatures):
            continue
        logprobs = legacy_logprobs(list(output.logprobs)) if body.logprobs is not None else None
        yield _chunk(meta, [{
            "index": index, "text": output.text, "logprobs": logprobs,
            "finish_reason": output.finish_reason.value if output.finished else None,
            **({"temperatures": finite_temperatures(output.temperatures)}
               if body.return_temperatures else {})}])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if include_usage:
            yield _chunk(meta, [], usage(_prompt_tokens(body, translated), completion_tokens))
    yield "[DONE]"
