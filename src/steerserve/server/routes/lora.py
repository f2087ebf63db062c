"""Runtime LoRA adapter management (vLLM's bodies): an admin operation, off by default."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from steerserve.adapters.lora.files import (
    AdapterError,
    LoraAdapter,
    resolve_adapter_path,
)
from steerserve.adapters.registry import NameTaken
from steerserve.server.body import parse_request
from steerserve.server.context import ServingContext
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import LoadLoraRequest, UnloadLoraRequest

logger = logging.getLogger(__name__)


def register(ctx: ServingContext, name: str, path: Path) -> LoraAdapter:
    """Read, check and publish an adapter (slow: runs off the event loop)."""
    if name in ctx.engine.models:
        raise APIError(400, f"'{name}' is a hosted base model's name", "lora_name")
    try:
        adapter = ctx.engine.load_adapter(name, path, ctx.settings.max_lora_rank)
    except NameTaken as exc:
        raise APIError(400, str(exc), "lora_name") from exc
    except AdapterError as exc:
        raise APIError(exc.status, str(exc), exc.param or "lora_path") from exc
    logger.info("loaded LoRA adapter '%s' (rank %d, %s) from %s", name, adapter.rank,
                ", ".join(adapter.target_modules), path)
    return adapter


def _require_runtime_lora(ctx: ServingContext) -> None:
    if not ctx.settings.allow_runtime_lora:
        raise APIError(403, "runtime LoRA loading is disabled; start the server with "
                       "--allow-runtime-lora", code="runtime_lora_disabled")


async def load_lora(request: Request, ctx: ServingContext) -> JSONResponse:
    _require_runtime_lora(ctx)
    req = await parse_request(request, LoadLoraRequest, ctx.settings.max_body_bytes)
    root = Path(ctx.settings.adapter_dir) if ctx.settings.adapter_dir else None
    if root is None:
        raise APIError(400, "runtime loading needs an adapter root (--adapter-dir)", "lora_path")
    try:
        path = resolve_adapter_path(req.lora_path, root)
    except AdapterError as exc:
        raise APIError(exc.status, str(exc), exc.param or "lora_path") from exc
    await asyncio.to_thread(register, ctx, req.lora_name, path)
    if ctx.shared is not None:  # every other replica loads it before its next request
        await asyncio.to_thread(ctx.shared.publish_lora, req.lora_name, path)
    return JSONResponse({"status": "ok", "message": f"adapter '{req.lora_name}' loaded"})


async def unload_lora(request: Request, ctx: ServingContext) -> JSONResponse:
    _require_runtime_lora(ctx)
    req = await parse_request(request, UnloadLoraRequest, ctx.settings.max_body_bytes)
    if ctx.engine.adapters.get(req.lora_name) is None:  # checked before anything changes
        raise APIError(404, f"no adapter named '{req.lora_name}' is loaded", "lora_name",
                       "model_not_found")
    if ctx.shared is not None:
        await asyncio.to_thread(ctx.shared.retract_lora, req.lora_name)
    ctx.engine.unload_adapter(req.lora_name)
    # Lanes already running keep their slot until they finish; new requests get a 404.
    return JSONResponse({"status": "ok", "message": f"adapter '{req.lora_name}' unloaded"})
