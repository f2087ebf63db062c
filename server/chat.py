"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.body import parse_request
from server.choices import ChoiceResult, ChoiceSpec, collect, ensure_capacity, run_choices
from server.context import ServingContext, require_model
from server.convert import (
    chat_prompt,
    check_chat_extras,
    check_common,
    completion_budget,
    sampling_params,
)
from server.errors import error_payload
from server.formatting import chat_logprobs, new_id, usage
from server.schemas import ChatCompletionRequest


def build_specs(ctx: ServingContext, req: ChatCompletionRequest) -> list[ChoiceSpec]:
    check_common(req, ctx.limits)
    check_chat_extras(req, ctx.settings.allow_request_chat_template)
    prompt = chat_prompt(ctx.model.tokenizer, req)
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = completion_budget(requested, len(prompt), ctx.limits, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    return [ChoiceSpec(i, prompt, sampling_params(req, max_tokens, top, choice=i))
            for i in range(req.n)]


async def chat_completions(request: Request, ctx: ServingContext):
    req = await parse_request(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    require_model(ctx, req.model)
    specs = build_specs(ctx, req)
    ensure_capacity(ctx, len(specs))
    response_id, created = new_id("chatcmpl"), int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_chat(ctx, response_id, created, specs, include_usage, req.logprobs)
        return EventSourceResponse(events, ping=15)
    results = await collect(ctx, response_id, specs)
    return JSONResponse(chat_response(ctx, response_id, created, results, req.logprobs))


def chat_response(ctx: ServingContext, response_id: str, created: int,
                  results: list[ChoiceResult], logprobs: bool) -> dict:
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        return error_payload(500, failed.error)
    choices = [{
        "index": r.index,
        "message": {"role": "assistant", "content": r.text},
        "logprobs": chat_logprobs(r.logprobs) if logprobs else None,
        "finish_reason": r.finish_reason,
    } for r in results]
    return {"id": response_id, "object": "chat.completion", "created": created,
            "model": ctx.model_name, "choices": choices,
            "usage": usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))}


def _chunk(ctx: ServingContext, response_id: str, created: int, choices: list[dict],
           usage_block: dict | None = None) -> str:
    body = {"id": response_id, "object": "chat.completion.chunk", "created": created,
            "model": ctx.model_name, "choices": choices}
    if usage_block is not None:
        body["usage"] = usage_block
    return json.dumps(body, ensure_ascii=False)


async def stream_chat(ctx: ServingContext, response_id: str, created: int,
                      specs: list[ChoiceSpec], include_usage: bool,
                      logprobs: bool) -> AsyncIterator[str]:
    for spec in specs:  # role first, once per choice
        yield _chunk(ctx, response_id, created, [{
            "index": spec.index, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None}])
    prompt_tokens, completion_tokens = len(specs[0].prompt_ids), 0
    async for index, output in run_choices(ctx, response_id, specs):
        if output.error:
            yield json.dumps(error_payload(500, output.error))
            break
        if not (output.text or output.finished or (logprobs and output.logprobs)):
            continue
        delta = {"content": output.text} if output.text else {}
        yield _chunk(ctx, response_id, created, [{
            "index": index, "delta": delta,
            "logprobs": chat_logprobs(output.logprobs) if logprobs else None,
            "finish_reason": output.finish_reason.value if output.finished else None}])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if include_usage:
            yield _chunk(ctx, response_id, created, [],
                         usage(prompt_tokens, completion_tokens))
    yield "[DONE]"
