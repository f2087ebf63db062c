"""Tool-calling request fields (OpenAI's chat shapes): function tools, `tool_choice`, and the
assistant `tool_calls` and `tool` messages a conversation carries back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from steerserve.server.schemas.base import Strict

MAX_TOOLS = 128
FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionDefinition(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class ChatTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1024 * 1024)  # JSON text, as the API returned it


class ToolCall(Strict):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall
