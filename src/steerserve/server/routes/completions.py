"""POST /v1/completions (text or token-id prompts; echo + logprobs for scoring)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import Response

from steerserve.decoding.request import EngineRequest, RequestOutput
from steerserve.server.context import ServingContext
from steerserve.server.formatting import legacy_logprobs
from steerserve.server.routes.choices import ChoiceResult
from steerserve.server.routes.generation import (
    Call,
    Route,
    ending,
    method_report,
    output_ending,
    respond,
    stream_choices,
    whole_response,
)
from steerserve.server.schemas.requests import CompletionRequest
from steerserve.server.translate.request import Translated, completion_requests

OBJECT = "text_completion"  # whole responses and chunks alike


async def completions(request: Request, ctx: ServingContext) -> Response:
    return await respond(request, ctx, COMPLETIONS)


def _prompt_text(translated: Translated, request: EngineRequest) -> str:
    return translated.served.info.tokenizer.decode(request.prompt_ids)


def _prompt_tokens(call: Call[CompletionRequest]) -> int:
    return sum(len(r.prompt_ids) for r in call.translated.requests[:: call.body.n])


def completion_response(call: Call[CompletionRequest], results: list[ChoiceResult]) -> dict:
    body, translated = call.body, call.translated
    choices = []
    for request, result in zip(translated.requests, results, strict=True):
        prefix = _prompt_text(translated, request) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(list(result.prompt_logprobs or ()) + result.logprobs)
        choices.append({
            "index": result.index, "text": prefix + result.text, "logprobs": logprobs,
            **ending(result.finish_reason,
                     result.temperatures if body.return_temperatures else None),
            **method_report(result.reports, result.method_values)})
    return whole_response(call.meta, OBJECT, choices, _prompt_tokens(call), results)


def _delta(body: CompletionRequest, index: int, output: RequestOutput) -> dict | None:
    if not (output.text or output.finished or output.logprobs or output.temperatures
            or output.method_values):
        return None
    logprobs = legacy_logprobs(list(output.logprobs)) if body.logprobs is not None else None
    return {"index": index, "text": output.text, "logprobs": logprobs,
            **output_ending(output, body.return_temperatures)}


def stream_completion(ctx: ServingContext, call: Call[CompletionRequest]) -> AsyncIterator[str]:
    translated = call.translated
    echoes = ({"index": index, "text": _prompt_text(translated, request),
               "logprobs": None, "finish_reason": None}
              for index, request in enumerate(translated.requests)) if call.body.echo else ()
    return stream_choices(ctx, call, OBJECT, echoes, partial(_delta, call.body),
                          _prompt_tokens(call))


COMPLETIONS = Route(CompletionRequest, "cmpl", completion_requests, stream_completion,
                    completion_response)
