"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import Response

from steerserve.decoding.request import RequestOutput
from steerserve.server.context import ServingContext
from steerserve.server.formatting import chat_logprobs
from steerserve.server.routes.choices import ChoiceResult
from steerserve.server.routes.generation import (
    Call,
    Route,
    ending,
    output_ending,
    respond,
    stream_choices,
    whole_response,
)
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.translate.request import chat_requests

CHUNK = "chat.completion.chunk"


async def chat_completions(request: Request, ctx: ServingContext) -> Response:
    return await respond(request, ctx, CHAT)


def chat_response(call: Call[ChatCompletionRequest], results: list[ChoiceResult]) -> dict:
    body = call.body
    choices = [{
        "index": r.index,
        "message": {"role": "assistant", "content": r.text},
        "logprobs": chat_logprobs(r.logprobs) if body.logprobs else None,
        **ending(r.finish_reason, r.temperatures if body.return_temperatures else None),
    } for r in results]
    return whole_response(call.meta, "chat.completion", choices, results[0].prompt_tokens,
                          results)


def _delta(body: ChatCompletionRequest, index: int, output: RequestOutput) -> dict | None:
    if not (output.text or output.finished or (body.logprobs and output.logprobs)
            or output.temperatures):
        return None
    return {"index": index, "delta": {"content": output.text} if output.text else {},
            "logprobs": chat_logprobs(output.logprobs) if body.logprobs else None,
            **output_ending(output, body.return_temperatures)}


def stream_chat(ctx: ServingContext, call: Call[ChatCompletionRequest]) -> AsyncIterator[str]:
    roles = [{"index": index, "delta": {"role": "assistant", "content": ""},
              "logprobs": None, "finish_reason": None}  # role first, once per choice
             for index in range(len(call.streams))]
    prompt_tokens = len(call.translated.requests[0].prompt_ids)
    return stream_choices(ctx, call, CHUNK, roles, partial(_delta, call.body), prompt_tokens)


CHAT = Route(ChatCompletionRequest, "chatcmpl", chat_requests, stream_chat, chat_response)
