"""Load generator for OpenAI-compatible streaming chat endpoints.

Sends streamed chat completions with a fixed concurrency and measures, per request, the time to
the first content token (TTFT), the number of completion tokens and their mean gap after the
first (the inter-token latency); per level, the generated tokens per second of wall time. Used
for steerserve, vLLM, `transformers serve` and llama-server alike.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# Short, varied user prompts (roughly 10-40 tokens each after tokenization).
PROMPTS: tuple[str, ...] = (
    "Explain in simple terms why the sky is blue.",
    "Write a short poem about a cat who wants to learn to fly.",
    "What are three tips for staying focused while studying at home?",
    "Describe the water cycle for a ten year old, step by step.",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "Summarize the plot of a detective story set in a small seaside town in the 1920s.",
    "Why do leaves change color in autumn? Answer in a few sentences.",
    "List some good habits for writing clean and readable Python code.",
    "What is the difference between weather and climate?",
    "Tell me a story about a robot that finds an old map in a library.",
    "How does a bicycle stay upright when it is moving?",
    "Suggest a name for a small bakery and explain why it fits.",
    "What should I pack for a three day hiking trip in the mountains in spring?",
    "Explain what a prime number is and give five examples.",
    "Write a friendly email inviting a colleague to a team lunch on Friday.",
    "Compare trains and planes for travelling between two nearby cities.",
)


def with_long_prompt(prompts: Sequence[str], tokens: int, documents: int = 4) -> tuple[str, ...]:
    """`prompts` `documents` times over, the first of each copy made a long document of about
    `tokens` tokens (the prompts' text, numbered, as reader questions, each document starting
    at another one, so no two share a prefix beyond their first line) and a question about
    it: one request in len(prompts) carries a long context, as in a chat server's real mix."""
    if tokens <= 0:
        return tuple(prompts)
    mixed: list[str] = []
    for document in range(documents):
        lines, index = [], 0
        while sum(len(line) for line in lines) < tokens * 4:  # about 4 characters a token
            lines.append(f"{index + 1}. {prompts[(index + document) % len(prompts)]}")
            index += 1
        mixed.append("Readers sent these questions:\n" + "\n".join(lines)
                     + "\nWhich three are the most alike, and why?")
        mixed.extend(prompts[1:])
    return tuple(mixed)


@dataclass
class RequestResult:
    """Outcome of one streamed request."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    # False when the server sent no usage chunk and tokens were counted from content chunks.
    tokens_from_usage: bool = False
    error: str | None = None

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency after the first token (None for fewer than 2 tokens)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class LevelResult:
    """Aggregate of one concurrency level."""

    concurrency: int
    requests: int
    ok_requests: int
    wall_s: float
    completion_tokens: int
    gen_tok_s: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    itl_p50_ms: float | None  # per request: (latency - TTFT) / (tokens - 1); median of those
    latency_p50_s: float | None
    tokens_per_request: float | None
    tokens_from_usage: bool
    errors: list[str] = field(default_factory=list)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (same as numpy's default); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(
    concurrency: int, results: Sequence[RequestResult], wall_s: float, note: str | None = None
) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    p50, p90 = percentile(ttfts, 50), percentile(ttfts, 90)
    itl = percentile([r.itl_s for r in ok if r.itl_s is not None], 50)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        ok_requests=len(ok),
        wall_s=wall_s,
        completion_tokens=tokens,
        gen_tok_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50_ms=None if p50 is None else p50 * 1000,
        ttft_p90_ms=None if p90 is None else p90 * 1000,
        itl_p50_ms=None if itl is None else itl * 1000,
        latency_p50_s=percentile([r.latency_s for r in ok], 50),
        tokens_per_request=statistics.fmean(r.completion_tokens for r in ok) if ok else None,
        tokens_from_usage=bool(ok) and all(r.tokens_from_usage for r in ok),
        errors=sorted({r.error for r in results if r.error})[:5],
        note=note,
    )


def _apply_chunk(chunk: dict[str, Any], start: float, result: RequestResult, counted: list[int]):
    """Fold one parsed SSE chunk into `result`; `counted` tallies content chunks as a fallback."""
    if "error" in chunk:
        raise RuntimeError(f"server error in stream: {chunk['error']}")
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            counted[0] += 1
            if result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
        result.tokens_from_usage = True


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float
) -> RequestResult:
    """POST one streamed chat completion and parse its SSE stream (`data: {...}` lines).

    The stream ends at `data: [DONE]` or when the server closes it (transformers serve sends
    no [DONE]). Never raises: failures are returned as a not-ok result.
    """
    start = time.perf_counter()
    result = RequestResult(ok=False, latency_s=0.0)
    counted = [0]
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), `event:` lines
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                _apply_chunk(json.loads(data), start, result, counted)
        if not result.tokens_from_usage:
            result.completion_tokens = counted[0]
        result.ok = result.completion_tokens > 0
        if not result.ok:
            result.error = "stream ended without content"
    except (TimeoutError, httpx.HTTPError, RuntimeError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.latency_s = time.perf_counter() - start
    return result


def make_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    # trust_env=False: never route loopback traffic through a proxy from the environment.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        trust_env=False,
    )


async def run_level(
    url: str,
    make_body: Callable[[str], dict[str, Any]],
    concurrency: int,
    n_requests: int,
    timeout_s: float,
    prompts: Sequence[str] = PROMPTS,
) -> LevelResult:
    """Send `n_requests` requests, at most `concurrency` in flight; wall time covers all of them."""
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> RequestResult:
        async with sem:
            return await stream_chat(client, url, make_body(prompts[i % len(prompts)]), timeout_s)

    async with make_client(concurrency, timeout_s) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(n_requests)))
        wall = time.perf_counter() - start
    return summarize(concurrency, results, wall)


async def get_json(url: str, timeout_s: float = 10.0) -> Any:
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        resp = await client.get(url)
        resp.raise_for_status()
        return resp.json()
