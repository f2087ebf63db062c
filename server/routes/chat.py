"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from steerserve.server.body import parse_request
from steerserve.server.context import Served, ServingContext, resolve_model
from steerserve.server.errors import error_payload
from steerserve.server.formatting import ResponseMeta, chat_logprobs, new_id, usage
from steerserve.server.routes.choices import (
    ChoiceResult,
    ChoiceSpec,
    collect,
    ensure_capacity,
    run_choices,
)
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.translate.adaptive import resolve_adaptive
from steerserve.server.translate.decoding import Target, describe, resolve_method
from steerserve.server.translate.sampling import (
    chat_prompt,
    check_chat_extras,
    check_common,
    completion_budget,
    sampling_params,
)
from steerserve.server.translate.steering import resolve_steering

CHUNK = "chat.completion.chunk"


def build_specs(ctx: ServingContext, req: ChatCompletionRequest,
                served: Served) -> list[ChoiceSpec]:
    check_common(req, served.limits)
    check_chat_extras(req, ctx.settings.allow_request_chat_template)
    prompt = chat_prompt(served.model.tokenizer, req)
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = completion_budget(requested, len(prompt), served.limits, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    steering = resolve_steering(req.steering, ctx.vectors, served.shape, served.model.device)
    adaptive = resolve_adaptive(req, ctx.temperature_heads)
    method = resolve_method(ctx, req, Target(served.name, served.adapter),
                            lambda model, _: chat_prompt(ctx.models[model].tokenizer, req),
                            steering, scoring=False, chat=True)
    return [ChoiceSpec(i, prompt, sampling_params(req, max_tokens, top, choice=i,
                                                  adaptive=adaptive), served.adapter, steering,
                       served.name, method) for i in range(req.n)]


async def chat_completions(request: Request, ctx: ServingContext):
    req = await parse_request(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    specs = build_specs(ctx, req, resolve_model(ctx, req.model))
    ensure_capacity(ctx, len(specs))
    meta = ResponseMeta(new_id("chatcmpl"), int(time.time()), req.model, describe(req.decoding))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_chat(ctx, meta, specs, include_usage, req.logprobs,
                             req.return_temperatures)
        return EventSourceResponse(events, ping=15)
    results = await collect(ctx, meta.id, specs)
    return JSONResponse(chat_response(meta, results, req.logprobs, req.return_temperatures))


def chat_response(meta: ResponseMeta, results: list[ChoiceResult], logprobs: bool,
                  temperatures: bool = False) -> dict:
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        return error_payload(500, failed.error)
    choices = [{
        "index": r.index,
        "message": {"role": "assistant", "content": r.text},
        "logprobs": chat_logprobs(r.logprobs) if logprobs else None,
        "finish_reason": r.finish_reason,
        **({"temperatures": r.temperatures} if temperatures else {}),
    } for r in results]
    body = meta.envelope("chat.completion", choices)
    body["usage"] = usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
    return body


def _chunk(meta: ResponseMeta, choices: list[dict], usage_block: dict | None = None) -> str:
    body = meta.envelope(CHUNK, choices)
    if usage_block is not None:
        body["usage"] = usage_block
    return json.dumps(body, ensure_ascii=False)


async def stream_chat(ctx: ServingContext, meta: ResponseMeta, specs: list[ChoiceSpec],
                      include_usage: bool, logprobs: bool,
                      temperatures: bool = False) -> AsyncIterator[str]:
    for spec in specs:  # role first, once per choice
        yield _chunk(meta, [{"index": spec.index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
    prompt_tokens, completion_tokens = len(specs[0].prompt_ids), 0
    async for index, output in run_choices(ctx, meta.id, specs):
        if output.error:
            yield json.dumps(error_payload(500, output.error))
            break
        if not (output.text or output.finished or (logprobs and output.logprobs)
                or output.temperatures):
            continue
        yield _chunk(meta, [{
            "index": index, "delta": {"content": output.text} if output.text else {},
            "logprobs": chat_logprobs(output.logprobs) if logprobs else None,
            "finish_reason": output.finish_reason.value if output.finished else None,
            **({"temperatures": list(output.temperatures)} if temperatures else {})}])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if include_usage:
            yield _chunk(meta, [], usage(prompt_tokens, completion_tokens))
    yield "[DONE]"
