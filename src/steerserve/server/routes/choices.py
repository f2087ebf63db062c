"""Run a request's choices on the engine and merge their outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from steerserve.decoding.engine import (
    EngineUnavailable,
    Inadmissible,
    QueueFull,
    RequestStream,
)
from steerserve.decoding.request import EngineRequest, Failure, RequestOutput, TokenLogprob
from steerserve.server.context import ServingContext
from steerserve.server.errors import APIError, error_response

DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there


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
    failure: Failure | None = None
    temperatures: list[float] = field(default_factory=list)
    method_values: list[float] = field(default_factory=list)
    reports: str | None = None  # the field method_values are reported in

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.temperatures.extend(output.temperatures)
        self.method_values.extend(output.method_values)
        self.reports = output.reports or self.reports
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        if output.finished:
            self.finish_reason = output.finish_reason.value if output.finish_reason else None
            self.failure = output.failure


def open_streams(ctx: ServingContext, requests: list[EngineRequest]) -> list[RequestStream]:
    """Queue every choice or none, before any response starts (a stream's status goes out
    with its first byte)."""
    try:
        return ctx.engine.open(requests)
    except Inadmissible as exc:
        raise APIError(400, str(exc), exc.field) from exc
    except QueueFull as exc:
        raise APIError(429, "the server is busy: the request queue is full, retry later",
                       code="queue_full") from exc
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from exc


async def _pump(index: int, stream: RequestStream, merged: asyncio.Queue) -> None:
    async for output in stream:
        await merged.put((index, output))


async def run_choices(ctx: ServingContext, streams: list[RequestStream]
                      ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (choice index, output) as the engine produces them; interleaved across choices.
    Leaving early aborts every unfinished choice (and so frees their slots)."""
    merged: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, s, merged)) for i, s in enumerate(streams)]
    started, remaining = time.monotonic(), len(streams)
    first_seen = False
    try:
        while remaining:
            index, item = await merged.get()
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
        for stream in streams:
            stream.abort()


async def _accumulate(ctx: ServingContext, streams: list[RequestStream]) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(len(streams))]
    async for index, output in run_choices(ctx, streams):
        results[index].add(output)
    return results


async def collect(ctx: ServingContext, streams: list[RequestStream],
                  request: Request) -> list[ChoiceResult] | None:
    """Every choice, whole; None when the client went away first (its choices are aborted
    within DISCONNECT_POLL seconds, as a stream's are at its next write)."""
    task = asyncio.create_task(_accumulate(ctx, streams))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None


def failed_response(results: list[ChoiceResult] | None):
    """A non-2xx OpenAI error when any choice failed in the engine (or the client left),
    else None."""
    if results is None:
        return error_response(499, "the client closed the connection")
    failed = next((r.failure for r in results if r.failure is not None), None)
    return None if failed is None else error_response(failed.status, failed.message)
