"""/v1/steering/vectors: extract, list, describe, export and delete named steering vectors.

Extraction runs the hosted model on the engine thread, one batch of texts between two
decode steps, so requests in flight keep streaming while a vector is being extracted.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import tempfile
import time
from pathlib import Path

import torch
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.registry import NameTaken
from steerserve.adapters.steering.extract import compute_direction
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.adapters.steering.store import check_vector_name
from steerserve.adapters.steering.vectors import SteeringVector, export_gguf, save_safetensors
from steerserve.decoding.model.info import ModelInfo
from steerserve.server.body import parse_body, read_body
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.steering import ExtractVectorRequest
from steerserve.server.translate.steering import layer_list

logger = logging.getLogger(__name__)


def require_runtime_vectors(ctx: ServingContext) -> None:
    if not ctx.settings.allow_runtime_vectors:
        raise APIError(403, "creating and deleting steering vectors is disabled; start the "
                       "server with --allow-runtime-vectors", code="runtime_vectors_disabled")


def _adapter_error(exc: AdapterError, param: str) -> APIError:
    return APIError(exc.status, str(exc), exc.param or param)


def _tokenize(model: ModelInfo, texts: list[str], param: str) -> list[list[int]]:
    prompts = [model.tokenizer(text)["input_ids"] for text in texts]
    for ids in prompts:
        if not ids or len(ids) > model.max_model_len:
            raise APIError(400, f"each text must have 1..{model.max_model_len} tokens", param)
    return prompts


def _prompts(model: ModelInfo, req: ExtractVectorRequest) -> list[list[int]]:
    return _tokenize(model, req.positive, "positive") + _tokenize(model, req.negative,
                                                                  "negative")


def _check_request(ctx: ServingContext, req: ExtractVectorRequest) -> list[int]:
    try:
        check_vector_name(req.name)
    except AdapterError as exc:
        raise _adapter_error(exc, "name") from exc
    if ctx.vectors.get(req.name) is not None:
        raise APIError(400, f"a steering vector named '{req.name}' already exists", "name")
    if resolve_reference(ctx, req.model).adapter is not None:
        raise APIError(400, "vectors are extracted on a hosted model, not on an adapter", "model")
    if len(req.positive) != len(req.negative):
        raise APIError(400, f"positive has {len(req.positive)} texts but negative has "
                       f"{len(req.negative)}: they are pairs", "negative")
    if req.method != "mean_diff" and len(req.positive) < 2:
        raise APIError(400, f"method '{req.method}' needs at least 2 pairs", "positive")
    num_layers = ctx.engine.models[req.model].shape.num_layers
    # repeng's default: every block but the first.
    layers = req.layers if req.layers is not None else list(range(1, num_layers))
    return layer_list(layers, num_layers, "layers")


def batches(prompts: list[list[int]], most: int, budget: int) -> list[list[list[int]]]:
    """Consecutive prompts, at most `most` at a time and `budget` padded tokens per forward
    (the engine's prefill budget: streams wait no longer than behind a prefill); a longer
    prompt goes alone."""
    found: list[list[list[int]]] = []
    for prompt in prompts:
        last = found[-1] if found else None
        width = max([len(prompt), *(len(p) for p in last or [])])
        if last is not None and len(last) < most and width * (len(last) + 1) <= budget:
            last.append(prompt)
        else:
            found.append([prompt])
    return found


async def _activations(ctx: ServingContext, req: ExtractVectorRequest, prompts: list[list[int]],
                       layers: list[int]) -> dict[int, torch.Tensor]:
    target = SteerTarget(req.target)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    started, done = time.monotonic(), 0
    for batch in batches(prompts, req.batch_size, ctx.settings.max_prefill_tokens):
        done += len(batch)
        found = await ctx.engine.last_token_activations(req.model, batch, layers, target)
        for layer in layers:
            parts[layer].append(found[layer])
        logger.info("extracting steering vector '%s': %d/%d texts (%.1f s)", req.name,
                    done, len(prompts), time.monotonic() - started)
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def _directions(acts: dict[int, torch.Tensor], num_pairs: int,
                method: str) -> dict[int, torch.Tensor]:
    try:
        return {layer: compute_direction(a[:num_pairs], a[num_pairs:], method)
                for layer, a in acts.items()}
    except AdapterError as exc:
        raise _adapter_error(exc, "positive") from exc


async def extract_vector(request: Request, ctx: ServingContext) -> JSONResponse:
    raw = await read_body(request, ctx.settings.max_body_bytes)
    req = await ctx.off_loop(parse_body, raw, ExtractVectorRequest)
    layers = _check_request(ctx, req)
    prompts = await ctx.off_loop(_prompts, ctx.engine.models[req.model], req)
    acts = await _activations(ctx, req, prompts, layers)
    # On the engine thread: torch work on any other thread would start an OpenMP team there.
    directions = await ctx.engine.call(lambda: _directions(acts, len(req.positive), req.method))
    vector = SteeringVector(
        name=req.name, directions=directions, width=next(iter(acts.values())).shape[1],
        target=req.target, model=req.model, method=req.method,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        source="extracted")
    try:
        await asyncio.to_thread(ctx.vectors.add, vector, True)
    except NameTaken as exc:
        raise APIError(400, str(exc), "name") from exc
    logger.info("steering vector '%s' extracted (%s, layers %s)", req.name, req.method, layers)
    return JSONResponse(_card(vector))


def _card(vector: SteeringVector) -> dict:
    return {"id": vector.name, "object": "steering_vector", **vector.describe()}


def _get(ctx: ServingContext, name: str) -> SteeringVector:
    vector = ctx.vectors.get(name)
    if vector is None:
        raise APIError(404, f"no steering vector named '{name}'", "name", "vector_not_found")
    return vector


def list_vectors(ctx: ServingContext) -> JSONResponse:
    return JSONResponse({"object": "list",
                         "data": [_card(vector) for _, vector in ctx.vectors.items()]})


def describe_vector(ctx: ServingContext, name: str, file_format: str | None) -> Response:
    vector = _get(ctx, name)
    if file_format is None:
        return JSONResponse(_card(vector))
    if file_format not in ("gguf", "safetensors"):
        raise APIError(400, "format must be 'gguf' or 'safetensors'", "format")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.{file_format}"
        try:
            if file_format == "gguf":
                model = ctx.engine.models.get(vector.model or "", ctx.engine.primary)
                export_gguf(vector, path, model.model_type)  # repeng's hint
            else:
                save_safetensors(vector, path)
        except AdapterError as exc:
            raise _adapter_error(exc, "format") from exc
        content = path.read_bytes()
    return Response(content, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{name}.{file_format}"'})


def delete_vector(ctx: ServingContext, name: str) -> JSONResponse:
    if not ctx.vectors.remove(name):
        raise APIError(404, f"no steering vector named '{name}'", "name", "vector_not_found")
    # Requests in flight hold their own tensors and finish unchanged.
    return JSONResponse({"id": name, "object": "steering_vector", "deleted": True})
