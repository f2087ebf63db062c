"""Bodies of the tokenizer routes (server/routes/tokenizer.py), in vLLM's shapes."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from steerserve.server.schemas.requests import MAX_MESSAGES, ChatMessage, Strict

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize body (the body limit binds first)
MAX_TOKENIZE_CHARS = 1 << 20  # characters to tokenize in one call: about half a second here


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=MAX_DETOKENIZE)]
