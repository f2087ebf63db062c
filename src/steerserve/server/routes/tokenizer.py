"""Tokenizer routes in vLLM's shapes, at the root and under /v1: what evaluation harnesses
(lm-evaluation-harness's remote tokenizer) probe for, so a URL is all they need.

- POST /tokenize {"model"?, "prompt" | "messages", "add_special_tokens"?,
  "add_generation_prompt"?, "return_token_strs"?} -> {"count", "max_model_len", "tokens",
  "token_strs"}
- POST /detokenize {"model"?, "tokens"} -> {"prompt"}
- GET /tokenizer_info?model= -> the tokenizer's special tokens, chat template and limits

`model` names a hosted model or an adapter (an adapter shares its base's tokenizer). Behind
the API key like /v1; tokenization runs on the request worker, never on the event loop.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from steerserve.decoding.model.info import ModelInfo
from steerserve.server.auth import check_api_key
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.tokenizer import DetokenizeRequest, TokenizeRequest


def _info(ctx: ServingContext, model: str | None) -> ModelInfo:
    return resolve_reference(ctx, model or ctx.model_name).info


def tokenize(ctx: ServingContext, body: TokenizeRequest) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
    info = _info(ctx, body.model)
    tokenizer = info.tokenizer
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
    info = _info(ctx, body.model)
    vocab = len(info.tokenizer)
    bad = next((i for i, token in enumerate(body.tokens) if not 0 <= token < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {body.tokens[bad]} is outside the vocabulary "
                       f"(0..{vocab - 1})", f"tokens.{bad}")
    return {"prompt": info.tokenizer.decode(body.tokens)}


def tokenizer_info(ctx: ServingContext, model: str | None) -> dict:
    info = _info(ctx, model)
    tokenizer = info.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": info.max_model_len, "vocab_size": len(tokenizer)}


def install(app: FastAPI, ctx: ServingContext) -> None:
    async def tokenize_route(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        raw = await read_body(request, ctx.settings.max_body_bytes)
        body = await ctx.off_loop(parse_body, raw, TokenizeRequest)
        return JSONResponse(await ctx.off_loop(tokenize, ctx, body))

    async def detokenize_route(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        raw = await read_body(request, ctx.settings.max_body_bytes)
        body = await ctx.off_loop(parse_body, raw, DetokenizeRequest)
        return JSONResponse(await ctx.off_loop(detokenize, ctx, body))

    async def tokenizer_info_route(request: Request, model: str | None = None) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return JSONResponse(await ctx.off_loop(tokenizer_info, ctx, model))

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenize", tokenize_route, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize_route, methods=["POST"])
        app.add_api_route(f"{prefix}/tokenizer_info", tokenizer_info_route, methods=["GET"])
