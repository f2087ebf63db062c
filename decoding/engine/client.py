"""Bridge from asyncio handlers to the engine thread: submit, then await outputs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.engine.core import Engine
from steerserve.decoding.methods.strategies import DecodingMethod
from steerserve.decoding.request import GenerationRequest, RequestOutput
from steerserve.decoding.sampling.params import SamplingParams

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


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dispatcher = OutputDispatcher()

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    async def call(self, work: Callable[[], Result]) -> Result:
        """Run model work (vector extraction) on the engine thread, between steps."""
        return await asyncio.wrap_future(self.engine.call_between_steps(work))

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     adapter: AdapterWeights | None = None,
                     steering: SteeringSpec | None = None, model: str | None = None,
                     method: DecodingMethod | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Leaving early (the client went away,
        the handler was cancelled) aborts it, which frees its KV-cache slot at once."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:  # called on the engine thread
            self._dispatcher.send(loop, outputs, output)

        self.engine.submit(GenerationRequest(request_id, tuple(prompt_ids), params, sink,
                                             adapter, steering, model=model, method=method))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(request_id)
