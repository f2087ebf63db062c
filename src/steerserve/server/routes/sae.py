"""Sparse autoencoders: list them, and show what their features respond to, so a user can
pick a feature to steer by.

- GET /v1/saes -> each SAE's hook point, layer, width and architecture
- POST /v1/saes/{name}/top_features {"input", "top_k"?} -> per token, its top-k features
- POST /v1/saes/{name}/features/{feature} {"input", "threshold"?} -> the feature's activation
  on every token of the text, and the tokens where it fires

The text runs through the hosted model the SAE was loaded for (the first one), one forward
between two engine steps; its length is bounded by the prefill budget so that streams in
flight wait no longer than behind one prefill.
"""

from __future__ import annotations

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.server.auth import check_api_key
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext
from steerserve.server.errors import APIError
from steerserve.server.schemas.sae import FeatureActivationsRequest, TopFeaturesRequest


def _sae(ctx: ServingContext, name: str) -> SparseAutoencoder:
    sae = ctx.saes.get(name)
    if sae is None:
        raise APIError(404, f"no SAE named '{name}' (loaded: "
                       f"{', '.join(sorted(ctx.saes)) or 'none'})", "name", "sae_not_found")
    return sae


def _tokens(ctx: ServingContext, text: str) -> tuple[list[int], list[str]]:
    tokenizer = ctx.engine.primary.tokenizer
    ids = tokenizer(text)["input_ids"]
    budget = min(ctx.settings.max_prefill_tokens, ctx.engine.primary.max_model_len)
    if not ids or len(ids) > budget:
        raise APIError(400, f"input must have 1..{budget} tokens (it has {len(ids)})", "input")
    return ids, [tokenizer.decode([i]) for i in ids]


async def _features(ctx: ServingContext, sae: SparseAutoencoder,
                    ids: list[int]) -> torch.Tensor:
    """(S, d_sae) feature activations of the text's tokens, on the CPU."""
    hidden = await ctx.engine.prompt_activations(ctx.model_name, ids, sae.layer)
    return await ctx.engine.call(lambda: sae.encode(hidden.to(sae.encoders.device)).cpu())


async def top_features(request: Request, ctx: ServingContext, name: str) -> JSONResponse:
    sae = _sae(ctx, name)
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body = await ctx.off_loop(parse_body, raw, TopFeaturesRequest)
    ids, texts = await ctx.off_loop(_tokens, ctx, body.input)
    acts = await _features(ctx, sae, ids)
    values, features = acts.topk(min(body.top_k, sae.d_sae), dim=-1)
    tokens = [{"position": s, "token": texts[s], "token_id": ids[s],
               "features": [{"feature": int(f), "activation": float(v)}
                            for f, v in zip(features[s], values[s], strict=True) if v > 0]}
              for s in range(len(ids))]
    return JSONResponse({"object": "sae.top_features", "sae": name, "tokens": tokens})


async def feature_activations(request: Request, ctx: ServingContext, name: str,
                              feature: int) -> JSONResponse:
    sae = _sae(ctx, name)
    if not 0 <= feature < sae.d_sae:
        raise APIError(400, f"feature {feature} is out of range: SAE '{name}' has features "
                       f"0..{sae.d_sae - 1}", "feature")
    raw = await read_body(request, ctx.settings.max_body_bytes)
    body = await ctx.off_loop(parse_body, raw, FeatureActivationsRequest)
    ids, texts = await ctx.off_loop(_tokens, ctx, body.input)
    column = (await _features(ctx, sae, ids))[:, feature].tolist()
    tokens = [{"position": s, "token": texts[s], "token_id": ids[s], "activation": a}
              for s, a in enumerate(column)]
    return JSONResponse({"object": "sae.feature_activations", "sae": name, "feature": feature,
                         "tokens": tokens,
                         "fires_at": [t for t in tokens if t["activation"] > body.threshold]})


def install(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/v1/saes")
    async def list_saes(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return JSONResponse({"object": "list", "data": [
            {**sae.describe(), "model": sae.model_name or ctx.model_name}
            for _, sae in sorted(ctx.saes.items())]})

    @app.post("/v1/saes/{name}/top_features")
    async def top(request: Request, name: str) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return await top_features(request, ctx, name)

    @app.post("/v1/saes/{name}/features/{feature}")
    async def where(request: Request, name: str, feature: int) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return await feature_activations(request, ctx, name, feature)
