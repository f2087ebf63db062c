"""The FastAPI application: routes, auth, metrics and the engine's lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.routing import load_router
from steerserve.adapters.routing.features import FeatureModel, PromptRouter
from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.adapters.sae.files import load_sae
from steerserve.adapters.steering.store import VectorStore
from steerserve.decoding.engine import EngineClient, EngineConfig, EngineUnavailable
from steerserve.decoding.methods.deferral_head import DeferralHead, load_deferral_head
from steerserve.decoding.methods.registry import MethodRegistry
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.sampling.temperature_head import TemperatureHead, load_temperature_head
from steerserve.server import guards, openapi
from steerserve.server.auth import check_admin_key, check_api_key
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError, error_response, install_error_handlers
from steerserve.server.metrics import Metrics
from steerserve.server.routes import playground, responses, sae, tokenizer
from steerserve.server.routes.chat import chat_completions
from steerserve.server.routes.completions import completions
from steerserve.server.routes.lora import load_lora, register, unload_lora
from steerserve.server.routes.vectors import (
    delete_vector,
    describe_vector,
    extract_vector,
    list_vectors,
    require_runtime_vectors,
)
from steerserve.server.schemas.decoding import DecodingSchemas
from steerserve.server.settings import ServerSettings
from steerserve.server.shared_store import CatchUp, SharedStore

logger = logging.getLogger(__name__)


def build_context(settings: ServerSettings, model: LoadedModel,
                  others: list[LoadedModel] | None = None,
                  methods: MethodRegistry | None = None) -> ServingContext:
    others = others or []
    names = [model.name] + [m.name for m in others]
    if len(set(names)) != len(names):
        raise SystemExit(f"hosted model names must differ: {names}")
    routers = load_routers(settings, model)  # before the engine: it copies the model
    engine = EngineClient(model, EngineConfig(
        max_num_seqs=settings.max_num_seqs, max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_loras=settings.max_loras if settings.lora_enabled else 0,
        max_lora_rank=settings.max_lora_rank, forward=settings.forward,
        packed_weights=settings.packed_weights, compile_decode=settings.compile_decode,
        threads=settings.threads,
        prefix_cache_slots=settings.prefix_cache_slots), others)
    shared = SharedStore(Path(settings.shared_store)) if settings.shared_store else None
    ctx = ServingContext(settings, engine, Metrics(engine), int(time.time()),
                         load_vectors(settings, shared), load_heads(settings, model),
                         DecodingSchemas(methods or MethodRegistry()), shared=shared,
                         saes=load_saes(settings, model),
                         deferral_heads=load_deferral_heads(settings, model), routers=routers)
    for name, path in settings.loras:
        register(ctx, name, Path(path).expanduser().resolve())
    check_vector_widths(ctx)
    check_router_experts(ctx)
    if shared is not None:
        shared.sync(ctx)  # the adapters and heads other replicas published
    return ctx


def load_heads(settings: ServerSettings, model: LoadedModel) -> dict[str, TemperatureHead]:
    return _load_named(settings.temperature_heads, "--temperature-head", model, lambda path:
                       load_temperature_head(path, model.model.config.hidden_size),
                       lambda head: f"temperatures {list(head.config.temperatures)}")


def load_deferral_heads(settings: ServerSettings,
                        model: LoadedModel) -> dict[str, DeferralHead]:
    return _load_named(settings.deferral_heads, "--deferral-head", model, lambda path:
                       load_deferral_head(path, model.model.config.hidden_size),
                       lambda head: f"assistants {list(head.config.assistants)}")


def _load_named(entries: tuple[tuple[str, str], ...], option: str, model: LoadedModel,
                load, describe) -> dict:
    """Each NAME=PATH of a head option, checked against the first hosted model, on its
    device; a bad file stops the start naming the option."""
    loaded = {}
    for name, path in entries:
        try:
            head = load(Path(path).expanduser())
        except ValueError as exc:
            raise SystemExit(f"{option} {name}: {exc}") from exc
        loaded[name] = head.to(model.device)
        logger.info("%s: loaded '%s' (%s) from %s", option, name, describe(head), path)
    return loaded


def load_routers(settings: ServerSettings, model: LoadedModel) -> dict[str, PromptRouter]:
    """Each --router with its feature model (a float32 copy of the untouched base model)."""
    config, routers = model.model.config, {}
    for name, path in settings.routers:
        try:
            router = load_router(Path(path).expanduser(), config.hidden_size,
                                 config.num_hidden_layers)
            features = FeatureModel(model.model, router, settings.max_lora_rank)
            routers[name] = PromptRouter(router, features, model.name)
        except (ValueError, AdapterError) as exc:
            raise SystemExit(f"--router {name}: {exc}") from exc
        logger.info("loaded router '%s' (experts %s) from %s", name,
                    list(router.config.experts), path)
    return routers


def check_router_experts(ctx: ServingContext) -> None:
    for name, router in ctx.routers.items():
        for expert in router.experts:
            try:
                resolve_reference(ctx, expert)
            except APIError as exc:
                raise SystemExit(f"--router {name}: expert '{expert}' is not served (give "
                                 "it with --lora)") from exc


def load_saes(settings: ServerSettings, model: LoadedModel) -> dict[str, SparseAutoencoder]:
    """Each --sae, checked against the first hosted model's width and depth."""
    config, saes = model.model.config, {}
    for name, path in settings.saes:
        try:
            sae = load_sae(name, path, model.device)
        except AdapterError as exc:
            raise SystemExit(f"--sae {name}: {exc}") from exc
        if sae.d_in != config.hidden_size or sae.layer >= config.num_hidden_layers:
            raise SystemExit(f"--sae {name}: it reads width {sae.d_in} at layer {sae.layer} "
                             f"({sae.hook_name}); the model has hidden size "
                             f"{config.hidden_size} and {config.num_hidden_layers} blocks")
        saes[name] = sae
        logger.info("loaded SAE '%s' (%s, %d features at %s) from %s", name, sae.architecture,
                    sae.d_sae, sae.hook_name, path)
    return saes


def load_vectors(settings: ServerSettings, shared: SharedStore | None) -> VectorStore:
    """Each --steering-vector file (read, never copied), then the vectors directory (the
    shared store's, when there is one)."""
    directory = Path(settings.vectors_dir).expanduser() if settings.vectors_dir else None
    if shared is not None:
        directory = shared.vectors
    store = VectorStore(directory)
    try:
        for name, path in settings.steering_vectors:
            store.add_file(name, Path(path).expanduser())
            logger.info("loaded steering vector '%s' from %s", name, path)
        store.load_directory()
    except AdapterError as exc:
        raise SystemExit(f"steering vectors: {exc}") from exc
    return store


def check_vector_widths(ctx: ServingContext) -> None:
    """A vector file given at start must fit the model; directory files may belong to
    other models (they are refused per request, with a 400)."""
    given = {name for name, _ in ctx.settings.steering_vectors}
    shape = ctx.engine.primary.shape
    for name, vector in ctx.vectors.items():
        expected = shape.hidden_size if vector.target == "residual" else shape.heads_width
        if vector.width != expected:
            message = (f"steering vector '{name}' has width {vector.width}, the model needs "
                       f"{expected}")
            if name in given:
                raise SystemExit(message)
            logger.warning("%s: requests using it will be refused", message)


def model_cards(ctx: ServingContext) -> list[dict]:
    roots = {ctx.model_name: ctx.settings.model, **dict(ctx.settings.extra_models)}
    hosted = [{"id": name, "object": "model", "created": ctx.created, "owned_by": "steerserve",
               "root": roots.get(name, name), "parent": None,
               "max_model_len": info.max_model_len} for name, info in ctx.engine.models.items()]
    adapters = [{"id": name, "object": "model", "created": ctx.created,
                 "owned_by": "steerserve", "root": str(adapter.path),
                 "parent": ctx.model_name, "max_model_len": ctx.engine.primary.max_model_len}
                for name, adapter in ctx.engine.adapters.items()]
    return [*hosted, *adapters]


def create_app(ctx: ServingContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.engine.start()
        yield
        ctx.engine.stop()
        ctx.worker.shutdown(wait=False, cancel_futures=True)
        ctx.tokenizer_worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="steerserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if ctx.shared is not None:
        app.add_middleware(CatchUp, ctx=ctx)  # innermost: after the guards refused what they do
    guards.install(app, ctx.settings, ctx.draining, ctx.metrics.requests)

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(503, str(exc), code="engine_unavailable")

    @app.get("/health")
    async def health() -> JSONResponse:
        if ctx.engine.is_alive() and not ctx.draining.is_set():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped", "reason": ctx.engine.death},
                            status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return JSONResponse({"object": "list", "data": model_cards(ctx)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_api_key(request, ctx.settings.api_key)
        return await chat_completions(request, ctx)

    @app.post("/v1/completions")
    async def complete(request: Request):
        check_api_key(request, ctx.settings.api_key)
        return await completions(request, ctx)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        check_admin_key(request, ctx.settings)
        return await load_lora(request, ctx)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        check_admin_key(request, ctx.settings)
        return await unload_lora(request, ctx)

    @app.get("/v1/shared_store")
    async def shared_store(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        if ctx.shared is None:
            raise APIError(404, "this server has no --shared-store")
        return JSONResponse({"root": str(ctx.shared.root), "skipped": dict(ctx.shared.skipped)})

    add_steering_routes(app, ctx)
    playground.install(app, ctx)
    responses.install(app, ctx)
    sae.install(app, ctx)
    tokenizer.install(app, ctx)
    openapi.install(app, ctx.decoding, lambda: [card["id"] for card in model_cards(ctx)])
    return app


def add_steering_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/v1/steering/vectors")
    async def extract(request: Request):
        require_runtime_vectors(ctx)
        check_admin_key(request, ctx.settings)
        return await extract_vector(request, ctx)

    @app.get("/v1/steering/vectors")
    async def vectors(request: Request):
        check_api_key(request, ctx.settings.api_key)
        return list_vectors(ctx)

    @app.get("/v1/steering/vectors/{name}")
    async def vector(request: Request, name: str, format: str | None = None):  # noqa: A002
        check_api_key(request, ctx.settings.api_key)
        return await asyncio.to_thread(describe_vector, ctx, name, format)

    @app.delete("/v1/steering/vectors/{name}")
    async def delete(request: Request, name: str):
        require_runtime_vectors(ctx)
        check_admin_key(request, ctx.settings)
        return await asyncio.to_thread(delete_vector, ctx, name)
