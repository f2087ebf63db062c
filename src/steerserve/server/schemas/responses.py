"""The Responses API body (`POST /v1/responses`) and its translation into a chat body.

Stateless: nothing is stored, so `previous_response_id`, `conversation` and an explicit
`store: true` are refused (an absent `store`, OpenAI's default true, is taken as "don't
care": clients that never set it work). OpenAI fields this server cannot honour are a 400
naming them, unless they hold a value that changes nothing (`tools: []`,
`tool_choice: "auto"`...). The chat extensions (`steering`, `decoding`, `seed`...) are
accepted under their chat names and validated by the chat schema itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steerserve.server.body import decode_json
from steerserve.server.errors import APIError, validation_error
from steerserve.server.schemas.requests import (
    MAX_MESSAGES,
    ChatCompletionRequest,
    SamplingFields,
    Strict,
)

# Chat fields a Responses body may carry under the same name: every sampling field and
# extension the chat body has (a new one passes through by itself), less those the Responses
# API names or handles itself, or whose output it has no place for.
PASSTHROUGH = frozenset(SamplingFields.model_fields) - {
    "model", "stream", "stream_options", "n", "store", "return_temperatures"}


def _text_only(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    rest = {k: v for k, v in value.items() if k != "format" and v is not None}
    return not rest and value.get("format") in (None, {"type": "text"})


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


# OpenAI fields accepted only at a value that changes nothing here, with why others are not.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "previous_response_id": (lambda v: v is None, "this server is stateless: it stores no "
                             "responses; send the whole conversation in `input`"),
    "store": (lambda v: v is not True, "this server is stateless: it stores no responses; "
              "omit `store` or set it to false"),
    "conversation": (lambda v: v is None, "this server is stateless: it stores no "
                     "conversations; send the whole conversation in `input`"),
    "background": (lambda v: v in (None, False), "background responses need a stored "
                   "response; this server is stateless"),
    "tools": (_empty, "tool calling is not supported by this server"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not supported by "
                    "this server"),
    "text": (lambda v: v is None or _text_only(v), "only text output "
             "({'format': {'type': 'text'}}) is supported"),
    "truncation": (lambda v: v in (None, "disabled"), "truncation 'auto' is not supported: "
                   "an input longer than the context is a 400"),
    "include": (_empty, "no extra output data (`include`) is supported"),
    "top_logprobs": (lambda v: v in (None, 0), "logprobs are not supported on "
                     "/v1/responses; use /v1/chat/completions"),
    "reasoning": (lambda v: v is None or (isinstance(v, dict) and all(
        x is None for x in v.values())), "reasoning options are not supported"),
    "prompt": (lambda v: v is None, "stored prompt templates are not supported"),
    **{name: (_empty, "not supported by this server") for name in (
        "context_management", "background_options", "image", "moderation", "access_programs",
        "prompt_cache_options")},
}


class ContentPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # output_text parts passed back as input
    logprobs: list | None = None


class InputMessage(Strict):
    """An easy input message, or an output message passed back (its id and status)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[ContentPart]
    id: str | None = None
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string(cls, value: Any) -> Any:
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class ResponsesRequest(BaseModel):
    """Extra fields are kept here and sorted out by `to_chat` (PASSTHROUGH, REFUSED or
    unknown)."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # include_obfuscation: nothing to pad here
    parallel_tool_calls: bool | None = None  # no tools, so nothing to parallelise
    max_tool_calls: int | None = Field(None, ge=0)
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    prompt_cache_retention: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _string(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    def given(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)


def _chat_param(param: str | None) -> str | None:
    """A chat error's field, as the Responses body names it."""
    if param is None:
        return None
    if param.split(".")[0] == "messages":
        return "input"
    return {"max_tokens": "max_output_tokens"}.get(param, param)


def as_responses_error(exc: APIError) -> APIError:
    return APIError(exc.status, exc.message.replace("max_tokens", "max_output_tokens"),
                    _chat_param(exc.param), exc.code)


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat body that generates this response; 400s name the Responses fields."""
    extras = dict(body.model_extra or {})
    for name, value in extras.items():
        if name in REFUSED and not REFUSED[name][0](value):
            raise APIError(400, f"{name}: {REFUSED[name][1]}", name, "unsupported_parameter")
        if name not in REFUSED and name not in PASSTHROUGH:
            raise APIError(400, f"unknown field '{name}'", name, "unknown_field")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += [{"role": m.role, "content": m.text()} for m in body.input]
    chat = {"model": body.model, "messages": messages, "stream": body.stream,
            "max_tokens": body.max_output_tokens,
            **{k: v for k, v in extras.items() if k in PASSTHROUGH}}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        raise as_responses_error(validation_error(exc)) from exc


def parse_responses(raw: bytes) -> tuple[ResponsesRequest, ChatCompletionRequest]:
    try:
        body = ResponsesRequest.model_validate(decode_json(raw))
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return body, to_chat(body)
