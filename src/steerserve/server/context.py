"""Everything a route needs, built once at start-up and stored on the app."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from steerserve.adapters.lora.files import LoraAdapter
from steerserve.adapters.lora.mix import MixCache
from steerserve.adapters.routing.features import PromptRouter, RoutingPending
from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.adapters.steering.store import VectorStore
from steerserve.decoding.engine import EngineClient
from steerserve.decoding.methods.deferral_head import DeferralHead
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.sampling.temperature_head import TemperatureHead
from steerserve.server.errors import APIError
from steerserve.server.metrics import Metrics
from steerserve.server.schemas.decoding import DecodingSchemas
from steerserve.server.settings import ServerSettings
from steerserve.server.shared_store import SharedStore
from steerserve.server.translate.structured import GrammarCache

Result = TypeVar("Result")
MAX_ROUTINGS = 4  # a translation waits for at most this many routings (one per prompt today)


@dataclass(frozen=True)
class ServingContext:
    settings: ServerSettings
    engine: EngineClient  # the one engine object routes use
    metrics: Metrics
    created: int
    vectors: VectorStore
    temperature_heads: dict[str, TemperatureHead]
    decoding: DecodingSchemas  # the methods offered, as request schemas
    vocab_checks: dict[tuple[str, str], bool] = field(default_factory=dict)
    lora_mixes: MixCache = field(default_factory=MixCache)  # per-request weighted adapters
    grammars: GrammarCache = field(default_factory=GrammarCache)  # structured outputs
    # Request parsing, tokenization and chat templates run here, one at a time (fast
    # tokenizers must not be used by two threads at once), never on the event loop.
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="steerserve-requests"))
    # The tokenizer routes' own worker, with their own tokenizer copies: a large /tokenize
    # never queues in front of a generation request's parsing.
    tokenizer_worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="steerserve-tokenizer"))
    route_tokenizers: dict[str, object] = field(default_factory=dict)
    # Routed-experts requests compute their routing here (a forward and a backward), so the
    # request worker is never held by one (adapters/routing/features.py).
    routing_worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="steerserve-routing"))
    draining: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM
    shared: SharedStore | None = None  # --shared-store: what replicas agree on
    saes: dict[str, SparseAutoencoder] = field(default_factory=dict)  # --sae, fixed at start
    deferral_heads: dict[str, DeferralHead] = field(default_factory=dict)  # --deferral-head
    routers: dict[str, PromptRouter] = field(default_factory=dict)  # --router, ELREA

    @property
    def model_name(self) -> str:
        return self.engine.primary.name

    async def off_loop(self, work: Callable[..., Result], *args) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.worker,
                                                                 partial(work, *args))

    async def translate(self, work: Callable[..., Result], *args) -> Result:
        """`work` (a body's translation) on the request worker; a routing it needs first is
        computed on the routing worker, then the translation runs again and finds it."""
        for _ in range(MAX_ROUTINGS):
            try:
                return await self.off_loop(work, *args)
            except RoutingPending as pending:
                await asyncio.get_running_loop().run_in_executor(self.routing_worker,
                                                                 pending.compute)
        return await self.off_loop(work, *args)

    async def on_tokenizer_worker(self, work: Callable[..., Result], *args) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_worker,
                                                                 partial(work, *args))


@dataclass(frozen=True)
class Served:
    """What a request's `model` names: a hosted model, or an adapter over the first one."""

    info: ModelInfo  # the hosted model
    adapter: LoraAdapter | None

    @property
    def name(self) -> str:
        return self.info.name


def resolve_reference(ctx: ServingContext, name: str, param: str = "model") -> Served:
    """A model reference: a hosted model (no adapter) or a LoRA adapter (vLLM's rule)."""
    info = ctx.engine.models.get(name)
    if info is not None:
        return Served(info, None)
    adapter = ctx.engine.adapters.get(name)
    if adapter is None:
        served = [*ctx.engine.models] + [n for n, _ in ctx.engine.adapters.items()]
        raise APIError(404, f"The model '{name}' does not exist on this server "
                       f"(served: {', '.join(served)})", param, "model_not_found")
    return Served(ctx.engine.primary, adapter)
