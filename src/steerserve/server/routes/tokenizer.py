"""Tokenizer routes in vLLM's shapes, at the root and under /v1: what evaluation harnesses
(lm-evaluation-harness's remote tokenizer) probe for, so a URL is all they need.

- POST /tokenize {"model"?, "prompt" | "messages", "add_special_tokens"?,
  "add_generation_prompt"?, "return_token_strs"?} -> {"count", "max_model_len", "tokens",
  "token_strs"}
- POST /detokenize {"model"?, "tokens"} -> {"prompt"}
- GET /tokenizer_info?model= -> the tokenizer's special tokens, chat template and limits

`model` names a hosted model or an adapter (an adapter shares its base's tokenizer). Behind
the API key like /v1. These routes run on a worker of their own with their own copy of each
tokenizer (fast tokenizers must not be used by two threads at once), answers rendered there
too: a large /tokenize never waits in front of a generation request's parsing, and the event
loop never encodes a long answer. Inputs are bounded (MAX_TOKENIZE_CHARS).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from steerserve.decoding.model.info import ModelInfo
from steerserve.server.auth import check_api_key
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.tokenizer import (
    MAX_TOKENIZE_CHARS,
    DetokenizeRequest,
    TokenizeRequest,
)


def _info(ctx: ServingContext, model: str | None) -> ModelInfo:
    return resolve_reference(ctx, model or ctx.model_name).info


def _tokenizer(ctx: ServingContext, info: ModelInfo):
    """These routes' own copy of the model's tokenizer (made on first use, on their worker)."""
    tokenizer = ctx.route_tokenizers.get(info.name)
    if tokenizer is None:
        tokenizer = ctx.route_tokenizers[info.name] = copy.deepcopy(info.tokenizer)
    return tokenizer


def tokenize(ctx: ServingContext, body: TokenizeRequest) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
    if body.messages and sum(len(m.text()) for m in body.messages) > MAX_TOKENIZE_CHARS:
        raise APIError(400, f"the messages hold more than {MAX_TOKENIZE_CHARS} characters",
                       "messages")
    info = _info(ctx, body.model)
    tokenizer = _tokenizer(ctx, info)
    if body.prompt is not None:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens
                                  is not False)
    else:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in body.messages],
                tokenize=False, add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # no template, or one that raises on these messages
            raise APIError(400, f"the chat template failed: {exc}", "messages") from exc
        tokens = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
    strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens,
            "token_strs": strs}


def detokenize(ctx: ServingContext, body: DetokenizeRequest) -> dict:
    tokenizer = _tokenizer(ctx, _info(ctx, body.model))
    vocab = len(tokenizer)
    bad = next((i for i, token in enumerate(body.tokens) if not 0 <= token < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {body.tokens[bad]} is outside the vocabulary "
                       f"(0..{vocab - 1})", f"tokens.{bad}")
    return {"prompt": tokenizer.decode(body.tokens)}


def tokenizer_info(ctx: ServingContext, model: str | None) -> dict:
    info = _info(ctx, model)
    tokenizer = _tokenizer(ctx, info)
    return {"tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": info.max_model_len, "vocab_size": len(tokenizer)}


def _rendered(answer: Callable[..., dict], *args) -> Callable[[], bytes]:
    """The route's work, its JSON rendered by the same worker."""
    return lambda: json.dumps(answer(*args), ensure_ascii=False).encode()


def install(app: FastAPI, ctx: ServingContext) -> None:
    async def answer(work: Callable[[], bytes]) -> Response:
        return Response(await ctx.on_tokenizer_worker(work), media_type="application/json")

    async def tokenize_route(request: Request) -> Response:
        check_api_key(request, ctx.settings.api_key)
        raw = await read_body(request, ctx.settings.max_body_bytes)
        body = await ctx.on_tokenizer_worker(parse_body, raw, TokenizeRequest)
        return await answer(_rendered(tokenize, ctx, body))

    async def detokenize_route(request: Request) -> Response:
        check_api_key(request, ctx.settings.api_key)
        raw = await read_body(request, ctx.settings.max_body_bytes)
        body = await ctx.on_tokenizer_worker(parse_body, raw, DetokenizeRequest)
        return await answer(_rendered(detokenize, ctx, body))

    async def tokenizer_info_route(request: Request, model: str | None = None) -> Response:
        check_api_key(request, ctx.settings.api_key)
        return await answer(_rendered(tokenizer_info, ctx, model))

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenize", tokenize_route, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize_route, methods=["POST"])
        app.add_api_route(f"{prefix}/tokenizer_info", tokenizer_info_route, methods=["GET"])
