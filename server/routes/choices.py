"""Run a request's choices (n per prompt) on the engine and merge their outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.engine.core import QueueFull
from steerserve.decoding.methods.strategies import DecodingMethod
from steerserve.decoding.request import RequestOutput, TokenLogprob
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.server.context import ServingContext
from steerserve.server.errors import APIError


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterWeights | None = None
    steering: SteeringSpec | None = None
    model: str | None = None  # hosted model (None: the first)
    method: DecodingMethod | None = None


@dataclass
class ChoiceResult:
    """A whole choice, accumulated for non-streaming responses."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    temperatures: list[float] = field(default_factory=list)

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.temperatures.extend(output.temperatures)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        if output.finished:
            self.finish_reason = output.finish_reason.value if output.finish_reason else None
            self.error = output.error


def ensure_capacity(ctx: ServingContext, num_choices: int) -> None:
    """Refuse before any response starts (a stream's status is sent with its first byte)."""
    if ctx.engine.engine.num_waiting + num_choices > ctx.settings.max_queue:
        raise APIError(429, "the server is busy: the request queue is full, retry later",
                       code="queue_full")


async def _pump(ctx: ServingContext, request_id: str, spec: ChoiceSpec,
                merged: asyncio.Queue) -> None:
    try:
        async for output in ctx.engine.stream(request_id, spec.prompt_ids, spec.params,
                                                spec.adapter, spec.steering, spec.model,
                                                spec.method):
            await merged.put((spec.index, output))
    except QueueFull as exc:
        await merged.put((spec.index, exc))


async def run_choices(ctx: ServingContext, request_id: str,
                      specs: list[ChoiceSpec]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (choice index, output) as the engine produces them; interleaved across choices.
    Leaving early cancels every choice (and so frees their slots)."""
    merged: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(ctx, f"{request_id}-{s.index}", s, merged))
             for s in specs]
    started, remaining = time.monotonic(), len(specs)
    first_seen = False
    try:
        while remaining:
            index, item = await merged.get()
            if isinstance(item, Exception):
                raise APIError(429, str(item))
            if item.token_ids and not first_seen:
                first_seen = True
                ctx.metrics.ttft.observe(time.monotonic() - started)
            remaining -= item.finished
            yield index, item
        ctx.metrics.latency.observe(time.monotonic() - started)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(ctx: ServingContext, request_id: str,
                  specs: list[ChoiceSpec]) -> list[ChoiceResult]:
    results = {s.index: ChoiceResult(s.index) for s in specs}
    async for index, output in run_choices(ctx, request_id, specs):
        results[index].add(output)
    return [results[s.index] for s in specs]
