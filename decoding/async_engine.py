"""Bridge from asyncio handlers to the engine thread: submit, then await outputs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from decoding.engine import Engine
from decoding.lora_slots import AdapterWeights
from decoding.sampling_params import SamplingParams
from decoding.sequence import GenerationRequest, RequestOutput


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: AdapterWeights | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Leaving early (the client went away,
        the handler was cancelled) aborts it, which frees its KV-cache slot at once."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(outputs.put_nowait, output)

        self.engine.submit(GenerationRequest(request_id, tuple(prompt_ids), params, sink,
                                             adapter))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(request_id)
