"""OpenAI request bodies (pydantic). Unknown fields are refused so a misspelt extension
option is an error, not a silently ignored setting; standard OpenAI fields that change
nothing here (user, metadata...) are accepted."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from steerserve.decoding.sampling.params import MAX_TOP_LOGPROBS
from steerserve.server.schemas.base import ResourceName, Strict
from steerserve.server.schemas.steering import Steering
from steerserve.server.schemas.structured import GuidedFields, ResponseFormat
from steerserve.server.schemas.tools import MAX_TOOLS, ChatTool, ToolCall, ToolChoice

Finite = Annotated[float, Field(allow_inf_nan=False)]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_MESSAGES = 4096
TOKEN_ID = re.compile(r"-?[0-9]{1,19}")  # ASCII only: int() also reads other digits


NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class AdaptiveTemperatureRequest(Strict):
    """`adaptive_temperature`: which rule picks each token's temperature (see the README)."""

    method: Literal["edt", "dynatemp", "learned"]
    t0: NonNegative | None = Field(None, le=2.0)  # edt, dynatemp; default: temperature or 1
    theta: Finite | None = Field(None, gt=0.0, le=100.0)  # edt
    n: Finite | None = Field(None, gt=0.0, lt=1.0)  # edt
    range: NonNegative | None = Field(None, le=2.0)  # dynatemp
    exponent: NonNegative | None = Field(None, le=10.0)  # dynatemp
    head: str | None = Field(None, min_length=1, max_length=128)  # learned
    level: Literal["token", "sequence"] | None = None  # learned
    choice: Literal["greedy", "sample"] | None = None  # learned


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # assistant's
    tool_call_id: str | None = Field(None, max_length=128)  # a tool message's

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


MAX_LORA_TERMS = 64  # the schema's bound; the server's is --max-loras
MAX_LORA_SCALE = 100.0


class LoraTerm(Strict):
    """One adapter of a weighted mix (llama.cpp's per-request `lora`, by name)."""

    name: str = Field(min_length=1, max_length=128)
    scale: Finite = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


class SamplingFields(GuidedFields):
    """Fields shared by chat and text completions, with the extensions vLLM users know."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: Finite | None = Field(None, ge=0.0, le=2.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Finite] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extensions (vLLM / llama.cpp names).
    top_k: int = Field(-1, ge=-1, le=INT64_MAX)  # clamped to the vocabulary
    min_p: Finite = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Finite = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # steerserve extensions.
    steering: Steering | None = None
    adaptive_temperature: AdaptiveTemperatureRequest | None = None
    decoding: dict[str, Any] | None = None  # per method: server/schemas/decoding.py
    lora: list[LoraTerm] | None = Field(None, min_length=1, max_length=MAX_LORA_TERMS)
    dynatemp_range: NonNegative | None = Field(None, le=2.0)  # llama.cpp's names
    dynatemp_exponent: NonNegative | None = Field(None, le=10.0)
    return_temperatures: bool = False
    response_format: ResponseFormat | None = None  # chat's; vLLM takes it on completions too

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids in ASCII digits, each id once ("1" and "01" are one id)."""
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed")
        ids: set[int] = set()
        for key, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            if int(key) in ids:
                raise ValueError(f"logit_bias names token id {int(key)} twice")
            ids.add(int(key))
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        for stop in [value] if isinstance(value, str) else value or []:
            if not stop:
                raise ValueError("stop strings must not be empty")
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings are limited to {MAX_STOP_LENGTH} characters")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # A request-supplied template is refused unless --allow-request-chat-template.
    chat_template: str | None = None
    in_context_alignment: Literal["none", "urial"] | None = None  # None: the server's default
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class LoadLoraRequest(Strict):
    lora_name: ResourceName
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(Strict):
    lora_name: ResourceName
    lora_int_id: int | None = None  # vLLM clients may send it; names identify adapters here
