"""Run several request shapes against one server, interleaved, and keep each one's best rate.

Interleaving means machine noise (this host is shared) hits every case alike; the ratios to
the first case are what the feature benchmarks report.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from bench_client import run_level
from bench_servers import log

BodyFactory = Callable[[str], dict]


def numbered_bodies(model: str, max_tokens: int, extra: Callable[[int], dict]) -> BodyFactory:
    """Streamed greedy chat bodies of `max_tokens` tokens; request i adds `extra(i)`."""
    index = itertools.count()

    def body(prompt: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True},
                **extra(next(index))}

    return body


def run_interleaved(url: str, cases: dict[str, Callable[[], BodyFactory]], concurrency: int,
                    repeats: int) -> dict[str, float]:
    """Generated tokens per second of wall time, best of `repeats` rounds, per case."""
    first = next(iter(cases.values()))
    asyncio.run(run_level(url, first(), concurrency, concurrency, 900))  # warm-up
    best: dict[str, float] = {}
    for round_index in range(repeats):
        for name, make_body in cases.items():
            result = asyncio.run(run_level(url, make_body(), concurrency, concurrency, 900))
            rate = result.completion_tokens / result.wall_s
            best[name] = max(best.get(name, 0.0), rate)
            log(f"round {round_index}: {name}: {rate:.1f} tok/s")
    return best


def ratio_table(best: dict[str, float], title: str) -> str:
    baseline = next(iter(best.values()))
    rows = [f"| {title} | tok/s | vs {next(iter(best))} |", "|---|---|---|"]
    rows += [f"| {name} | {rate:.1f} | {rate / baseline:.3f}x |" for name, rate in best.items()]
    return "\n".join(rows)
