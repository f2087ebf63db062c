"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

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
    method_report,
    output_ending,
    respond,
    stream_choices,
    whole_response,
)
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.tools.formats import CallReader, ParsedCall
from steerserve.server.translate.request import chat_requests

CHUNK = "chat.completion.chunk"


async def chat_completions(request: Request, ctx: ServingContext) -> Response:
    return await respond(request, ctx, CHAT)


def chat_response(call: Call[ChatCompletionRequest], results: list[ChoiceResult]) -> dict:
    body = call.body
    choices = []
    for r in results:
        message: dict = {"role": "assistant", "content": r.text}
        finish_reason = r.finish_reason
        reader = call.translated.call_reader()
        if reader is not None:
            read = reader.read_all(r.text)
            message["content"] = read.content or None
            if read.calls:
                message["tool_calls"] = [tool_call(c) for c in read.calls]
                finish_reason = _calls_ending(finish_reason)
        choices.append({
            "index": r.index, "message": message,
            "logprobs": chat_logprobs(r.logprobs) if body.logprobs else None,
            **ending(finish_reason, r.temperatures if body.return_temperatures else None),
            **method_report(r.reports, r.method_values)})
    return whole_response(call.meta, "chat.completion", choices, results[0].prompt_tokens,
                          results)


def tool_call(call: ParsedCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _calls_ending(finish_reason: str | None) -> str | None:
    """OpenAI's reason for an answer that calls tools (a cut one stays `length`)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


class ChoiceDeltas:
    """One choice's stream: text passes through, or through its tool-call reader."""

    def __init__(self, body: ChatCompletionRequest, reader: CallReader | None) -> None:
        self.body = body
        self.reader = reader
        self.calls = 0

    def __call__(self, index: int, output: RequestOutput) -> dict | None:
        delta: dict = {"content": output.text} if output.text else {}
        closing = output_ending(output, self.body.return_temperatures)
        if self.reader is not None:
            delta = self._read(output)
            if self.calls:
                closing["finish_reason"] = _calls_ending(closing["finish_reason"])
        if not (delta or output.finished or (self.body.logprobs and output.logprobs)
                or output.temperatures or output.method_values):
            return None
        return {"index": index, "delta": delta,
                "logprobs": chat_logprobs(output.logprobs) if self.body.logprobs else None,
                **closing}

    def _read(self, output: RequestOutput) -> dict:
        read = self.reader.feed(output.text)
        if output.finished:
            read = read.merge(self.reader.finish())
        delta: dict = {"content": read.content} if read.content else {}
        if read.calls:
            delta["tool_calls"] = [{"index": self.calls + i, **tool_call(c)}
                                   for i, c in enumerate(read.calls)]
            self.calls += len(read.calls)
        return delta


def stream_chat(ctx: ServingContext, call: Call[ChatCompletionRequest]) -> AsyncIterator[str]:
    roles = [{"index": index, "delta": {"role": "assistant", "content": ""},
              "logprobs": None, "finish_reason": None}  # role first, once per choice
             for index in range(len(call.streams))]
    prompt_tokens = len(call.translated.requests[0].prompt_ids)
    choices = [ChoiceDeltas(call.body, call.translated.call_reader()) for _ in call.streams]
    return stream_choices(ctx, call, CHUNK, roles,
                          lambda index, output: choices[index](index, output), prompt_tokens)


CHAT = Route(ChatCompletionRequest, "chatcmpl", chat_requests, stream_chat, chat_response)
