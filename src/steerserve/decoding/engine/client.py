"""The façade: the only engine object the server touches.

It builds the engine from the loaded models, hands out what may be known of the hosted
models, loads and unloads LoRA adapters, runs model work between steps (vector extraction),
reports admission numbers, and bridges requests to the engine thread: outputs come back as
async iterators, and leaving one early (the client went away, the handler was cancelled)
aborts its request, freeing its slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import torch

from steerserve.adapters.lora.files import LoraAdapter, load_lora_adapter
from steerserve.adapters.registry import AdapterRegistry
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.engine.output import EngineStats
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.request import EngineRequest, RequestOutput

Result = TypeVar("Result")


class OutputDispatcher:
    """Hands engine outputs to the event loop in batches: one wake-up of the loop per drain
    instead of one per request per step (32 streams would mean 32 wake-ups a step)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, RequestOutput]] = []
        self._scheduled = False

    def send(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
             output: RequestOutput) -> None:  # engine thread
        with self._lock:
            self._pending.append((queue, output))
            if self._scheduled:
                return
            self._scheduled = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, [], False
        for queue, output in batch:
            queue.put_nowait(output)


class RequestStream:
    """One submitted request's outputs, until it finishes; `abort` if left unfinished."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                output = await self.outputs.get()
                self.finished = output.finished
                yield output
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class EngineClient:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None,
                 others: list[LoadedModel] | None = None) -> None:
        """Hosts `model` (the default, carrying the LoRA adapters) and `others`; the engine
        thread starts with `start`."""
        self._engine = Engine(model, config, others)
        self._dispatcher = OutputDispatcher()
        self.adapters: AdapterRegistry[LoraAdapter] = AdapterRegistry()
        self.models: dict[str, ModelInfo] = self._engine.model_infos()
        self.primary: ModelInfo = self.models[model.name]

    # ---- lifetime and numbers ----------------------------------------------------------------
    def start(self) -> None:
        self._engine.start()

    def stop(self) -> None:
        self._engine.stop()

    def is_alive(self) -> bool:
        return self._engine.is_alive()

    @property
    def death(self) -> str | None:
        return self._engine.death

    @property
    def num_waiting(self) -> int:
        return self._engine.num_waiting

    @property
    def num_running(self) -> int:
        return self._engine.num_running

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    # ---- requests ------------------------------------------------------------------------------
    def open(self, requests: list[EngineRequest]) -> list[RequestStream]:
        """Queue every request or none (Inadmissible, QueueFull, EngineUnavailable)."""
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self._engine, r.request_id) for r in requests]

        def sink_for(stream: RequestStream):
            return lambda output: self._dispatcher.send(loop, stream.outputs, output)

        self._engine.submit_all([(r, sink_for(s)) for r, s in zip(requests, streams,
                                                                 strict=True)])
        return streams

    # ---- adapters --------------------------------------------------------------------------------
    @property
    def lora_enabled(self) -> bool:
        return self._engine.lora_targets() is not None

    def load_adapter(self, name: str, path: Path, max_rank: int) -> LoraAdapter:
        """Read and check an adapter against the primary model (slow: call off the event
        loop); NameTaken or AdapterError when refused."""
        targets = self._engine.lora_targets()
        return self.adapters.load(name, lambda: load_lora_adapter(
            name, path, targets, max_rank, dtype=self.primary.dtype))

    def unload_adapter(self, name: str) -> LoraAdapter | None:
        """New requests cannot pick it; lanes running on it finish first."""
        return self.adapters.remove(name)

    # ---- model work between steps ---------------------------------------------------------------
    async def call(self, work: Callable[[], Result]) -> Result:
        return await asyncio.wrap_future(self._engine.call_between_steps(work))

    async def last_token_activations(self, model: str, prompts: list[list[int]],
                                     layers: list[int], target: SteerTarget
                                     ) -> dict[int, torch.Tensor]:
        """Each prompt's last-token activation per layer: {layer: (B, W) fp32, on the CPU}.
        One forward between two steps (call it per batch so streams keep flowing)."""
        last = torch.tensor([len(p) - 1 for p in prompts])
        found = Capture(frozenset(layers), target, last)
        await self.call(lambda: self._engine.capture(model, prompts, found))
        return {layer: value.cpu() for layer, value in found.found.items()}

    async def prompt_activations(self, model: str, prompt: list[int], layer: int
                                 ) -> torch.Tensor:
        """One prompt's residual stream after block `layer` at every position: (S, H) fp32."""
        found = Capture(frozenset([layer]), SteerTarget.RESIDUAL, None)
        await self.call(lambda: self._engine.capture(model, [prompt], found))
        return found.found[layer][0]
