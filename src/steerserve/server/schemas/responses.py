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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from steerserve.server.body import decode_json
from steerserve.server.errors import APIError, validation_error
from steerserve.server.schemas.requests import (
    MAX_MESSAGES,
    ChatCompletionRequest,
    SamplingFields,
    Strict,
)
from steerserve.server.schemas.tools import MAX_TOOLS

# Chat fields a Responses body may carry under the same name: every sampling field and
# extension the chat body has (a new one passes through by itself), less those the Responses
# API names or handles itself, or whose output it has no place for.
PASSTHROUGH = (frozenset(SamplingFields.model_fields) | {"in_context_alignment"}) - {
    "model", "stream", "stream_options", "n", "store", "return_temperatures"}


def _formats_only(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    return all(v is None for k, v in value.items() if k != "format")


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
    "text": (lambda v: v is None or _formats_only(v), "only `text.format` is supported"),
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


class FunctionCallItem(Strict):
    """A call the model made earlier, passed back."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1024 * 1024)
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    """What a called function returned."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str
    id: str | None = None
    status: str | None = None


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return f"[{kind}]"  # bracketed: error locations drop it, as they drop union members' names


InputItem = Annotated[
    Annotated[InputMessage, Tag("[message]")] | Annotated[FunctionCallItem, Tag(
        "[function_call]")] | Annotated[FunctionCallOutputItem, Tag("[function_call_output]")],
    Discriminator(_item_kind)]


class FunctionTool(Strict):
    """A Responses function tool (flat, where chat nests it under `function`)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class ResponsesRequest(BaseModel):
    """Extra fields are kept here and sorted out by `to_chat` (PASSTHROUGH, REFUSED or
    unknown)."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: list[InputItem] = Field(min_length=1, max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # include_obfuscation: nothing to pad here
    parallel_tool_calls: bool | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
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
    parts = param.split(".")
    if parts[0] == "messages":
        return "input"
    if parts[0] == "response_format":  # chat's json_schema is flat in text.format
        return ".".join(["text", "format", *parts[2:]])
    if parts[0] == "tools" and parts[2:3] == ["function"]:
        return ".".join(parts[:2] + parts[3:])
    return {"max_tokens": "max_output_tokens"}.get(param, param)


def as_responses_error(exc: APIError) -> APIError:
    """A chat error as the Responses body would name it: its field and its message."""
    param = _chat_param(exc.param)
    message = exc.message.replace("max_tokens", "max_output_tokens")
    if exc.param and param != exc.param and message.startswith(f"{exc.param}:"):
        message = f"{param}:{message[len(exc.param) + 1:]}"
    return APIError(exc.status, message, param, exc.code)


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
    messages += chat_messages(body.input)
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"input: at most {MAX_MESSAGES} items, instructions counted as "
                       "one", "input")
    chat = {"model": body.model, "messages": messages, "stream": body.stream,
            "max_tokens": body.max_output_tokens, **chat_tools(body), **chat_format(body),
            **{k: v for k, v in extras.items() if k in PASSTHROUGH}}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        raise as_responses_error(validation_error(exc)) from exc


def chat_messages(items: list) -> list[dict]:
    """Input items as chat messages: a run of function calls is one assistant turn with
    tool_calls; each output is a tool message answering a call made before it."""
    messages: list[dict] = []
    called: set[str] = set()
    for index, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            called.add(item.call_id)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise APIError(400, f"no function_call before it has call_id "
                               f"'{item.call_id}'", f"input.{index}.call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.output})
        else:
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_tools(body: ResponsesRequest) -> dict:
    fields: dict[str, Any] = {}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": tool.model_dump(
            exclude={"type"}, exclude_none=True)} for tool in body.tools]
    if isinstance(body.tool_choice, NamedFunction):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        fields["tool_choice"] = body.tool_choice
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    return fields


def chat_format(body: ResponsesRequest) -> dict:
    """`text.format` as chat's response_format (the schema's fields sit flat here)."""
    text = body.given("text") or {}
    fmt = text.get("format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return {} if fmt is None else {"response_format": fmt}
    named = {k: v for k, v in fmt.items() if k != "type"}
    return {"response_format": {"type": "json_schema", "json_schema": named}}


def parse_responses(raw: bytes) -> tuple[ResponsesRequest, ChatCompletionRequest]:
    try:
        body = ResponsesRequest.model_validate(decode_json(raw))
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return body, to_chat(body)
