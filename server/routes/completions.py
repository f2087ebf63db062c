"""POST /v1/completions (text or token-id prompts; echo + logprobs for scoring)."""

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
from steerserve.server.formatting import ResponseMeta, legacy_logprobs, new_id, usage
from steerserve.server.routes.choices import (
    ChoiceResult,
    ChoiceSpec,
    collect,
    ensure_capacity,
    run_choices,
)
from steerserve.server.schemas.requests import CompletionRequest
from steerserve.server.translate.adaptive import resolve_adaptive
from steerserve.server.translate.decoding import Target, describe, resolve_method
from steerserve.server.translate.sampling import (
    check_common,
    check_completion_extras,
    completion_budget,
    completion_prompts,
    sampling_params,
)
from steerserve.server.translate.steering import resolve_steering


def lane_prompt(ctx: ServingContext, served: Served, prompt: list[int]):
    """Each lane's tokens for one prompt: the same text through that model's tokenizer,
    or through its chat template (proxy-tuning's expert_chat_template)."""
    text = served.model.tokenizer.decode(prompt)

    def prompt_for(model: str, chat_template: bool) -> list[int]:
        tokenizer = ctx.models[model].tokenizer
        if chat_template:
            return list(tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        return prompt if tokenizer is served.model.tokenizer else tokenizer(text)["input_ids"]

    return prompt_for


def build_specs(ctx: ServingContext, req: CompletionRequest, served: Served) -> list[ChoiceSpec]:
    check_common(req, served.limits)
    check_completion_extras(req)
    prompts = completion_prompts(served.model.tokenizer, req, served.limits.vocab_size)
    steering = resolve_steering(req.steering, ctx.vectors, served.shape, served.model.device)
    adaptive = resolve_adaptive(req, ctx.temperature_heads)
    scoring = req.logprobs if req.echo and req.logprobs is not None else None
    specs = []
    for p, prompt in enumerate(prompts):
        max_tokens = completion_budget(req.max_tokens, len(prompt), served.limits, "prompt")
        method = resolve_method(ctx, req, Target(served.name, served.adapter),
                                lane_prompt(ctx, served, prompt), steering, scoring is not None)
        for i in range(req.n):
            params = sampling_params(req, max_tokens, req.logprobs, scoring, choice=i,
                                     adaptive=adaptive)
            specs.append(ChoiceSpec(p * req.n + i, prompt, params, served.adapter, steering,
                                    served.name, method))
    return specs


async def completions(request: Request, ctx: ServingContext):
    req = await parse_request(request, CompletionRequest, ctx.settings.max_body_bytes)
    served = resolve_model(ctx, req.model)
    specs = build_specs(ctx, req, served)
    ensure_capacity(ctx, len(specs))
    meta = ResponseMeta(new_id("cmpl"), int(time.time()), req.model, describe(req.decoding))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_completion(ctx, req, meta, specs, include_usage)
        return EventSourceResponse(events, ping=15)
    results = await collect(ctx, meta.id, specs)
    return JSONResponse(completion_response(ctx, req, meta, specs, results))


def _choice_text_and_logprobs(ctx: ServingContext, req: CompletionRequest, spec: ChoiceSpec,
                              result: ChoiceResult) -> tuple[str, dict | None]:
    prefix = ctx.models[spec.model].tokenizer.decode(spec.prompt_ids) if req.echo else ""
    if req.logprobs is None:
        return prefix + result.text, None
    records = list(result.prompt_logprobs or ()) + result.logprobs
    return prefix + result.text, legacy_logprobs(records)


def completion_response(ctx: ServingContext, req: CompletionRequest, meta: ResponseMeta,
                        specs: list[ChoiceSpec], results: list[ChoiceResult]) -> dict:
    failed = next((r for r in results if r.error), None)
    if failed is not None:
        return error_payload(500, failed.error)
    choices = []
    for spec, result in zip(specs, results, strict=True):
        text, logprobs = _choice_text_and_logprobs(ctx, req, spec, result)
        choices.append({"index": spec.index, "text": text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
        if req.return_temperatures:
            choices[-1]["temperatures"] = result.temperatures
    prompt_tokens = sum(len(s.prompt_ids) for s in specs[:: req.n])
    body = meta.envelope("text_completion", choices)
    body["usage"] = usage(prompt_tokens, sum(r.completion_tokens for r in results))
    return body


def _chunk(meta: ResponseMeta, choices: list[dict], usage_block: dict | None = None) -> str:
    body = meta.envelope("text_completion", choices)
    if usage_block is not None:
        body["usage"] = usage_block
    return json.dumps(body, ensure_ascii=False)


async def stream_completion(ctx: ServingContext, req: CompletionRequest, meta: ResponseMeta,
                            specs: list[ChoiceSpec], include_usage: bool) -> AsyncIterator[str]:
    if req.echo:
        for spec in specs:
            text = ctx.models[spec.model].tokenizer.decode(spec.prompt_ids)
            yield _chunk(meta, [
                {"index": spec.index, "text": text, "logprobs": None, "finish_reason": None}])
    completion_tokens = 0
    async for index, output in run_choices(ctx, meta.id, specs):
        if output.error:
            yield json.dumps(error_payload(500, output.error))
            break
        if not (output.text or output.finished or output.logprobs or output.temperatures):
            continue
        logprobs = legacy_logprobs(list(output.logprobs)) if req.logprobs is not None else None
        yield _chunk(meta, [{
            "index": index, "text": output.text, "logprobs": logprobs,
            "finish_reason": output.finish_reason.value if output.finished else None,
            **({"temperatures": list(output.temperatures)} if req.return_temperatures
               else {})}])
        if output.finished:
            completion_tokens += output.completion_tokens
    else:
        if include_usage:
            prompt_tokens = sum(len(s.prompt_ids) for s in specs[:: req.n])
            yield _chunk(meta, [], usage(prompt_tokens, completion_tokens))
    yield "[DONE]"
