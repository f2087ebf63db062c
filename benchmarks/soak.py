#!/usr/bin/env python
"""Soak: hundreds of mixed requests at concurrency 32, a third of the clients leaving early.

    .venv/bin/python benchmarks/soak.py [--requests 400] [--concurrency 32] [--out soak.json]

Starts `steerserve serve` on the embedded SmolLM2 with the example uppercase adapter and a
random steering vector, then sends streamed and non-streamed chat requests mixing plain,
adapter, steered, proxy-tuned, SH2 and logit-arithmetic decoding (greedy, with logprobs); a
third of the clients go away at random points. Afterwards it checks what the reliability
issue asks (tests/test_soak.py runs the same checks, small, on a tiny model): no engine
error, every slot back, memory near its level after warm-up, /health 200, every completed
response well formed, and every completed response equal to the same request run alone (a
path may part only at a near tie: batch shapes move logits in the last bits). Prints
requests/s, TTFT p50/p99, errors and the server's RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Tell me about rivers.", "What is a good name for a cat?", "Describe the sea.",
           "How do plants grow?", "Give me a tip for cooking rice.", "Why is the sky blue?",
           "Write a line about autumn.", "What do bees do?"]
KINDS = ("plain", "adapter", "steered", "proxy", "sh2", "arithmetic")
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class Names:
    base: str
    adapter: str
    vector: str


@dataclass(frozen=True)
class Job:
    index: int
    kind: str
    stream: bool
    body: dict
    leave_after: float | None  # streams: chunks read; others: seconds waited; None: stays


@dataclass
class Outcome:
    index: int
    kind: str
    stream: bool
    left: bool = False
    status: int | None = None
    tokens: list[tuple[str, float, float]] = field(default_factory=list)  # token, lp, top2 gap
    text: str = ""
    finish_reason: str | None = None
    ttft: float | None = None
    problem: str | None = None  # why a completed response is not well formed


def body_for(kind: str, names: Names, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": names.base, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 2, "seed": seed}
    if kind == "adapter":
        body["model"] = names.adapter
    elif kind == "steered":
        body["steering"] = [{"vector": names.vector, "scale": 2.0}]
    elif kind == "proxy":
        body["decoding"] = {"method": "proxy_tuning", "expert": names.adapter,
                            "anti_expert": names.base, "alpha": 0.5}
    elif kind == "sh2":
        body["decoding"] = {"method": "sh2", "alpha": 2.0}
    elif kind == "arithmetic":
        body["decoding"] = {"method": "logit_arithmetic", "terms": [
            {"model": names.base, "weight": 1.0}, {"model": names.adapter, "weight": 0.5},
            {"model": names.base, "weight": -0.5}]}
    return body


def make_jobs(count: int, names: Names, max_tokens: int, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        kind, stream = KINDS[index % len(KINDS)], rng.random() < 0.5
        leaves = rng.random() < 1 / 3
        leave_after = (rng.randint(1, 4) if stream else rng.uniform(0.05, 0.6)) if leaves \
            else None
        body = body_for(kind, names, rng.choice(PROMPTS), rng.randint(4, max_tokens), index)
        jobs.append(Job(index, kind, stream, body, leave_after))
    return jobs


def _record(outcome: Outcome, item: dict, text: str) -> None:
    outcome.text += text
    for token in (item.get("logprobs") or {}).get("content") or []:
        top = [t["logprob"] for t in token["top_logprobs"]]
        gap = top[0] - top[1] if len(top) > 1 else float("inf")
        outcome.tokens.append((token["token"], token["logprob"], gap))
    outcome.finish_reason = item.get("finish_reason") or outcome.finish_reason


async def _stream(client: httpx.AsyncClient, job: Job, outcome: Outcome, started: float) -> None:
    chunks, done = 0, False
    async with client.stream("POST", "/v1/chat/completions", json={**job.body, "stream": True}
                             ) as response:
        outcome.status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                outcome.problem = f"error event: {event['error']['message']}"
                continue
            for choice in event["choices"]:
                text = choice["delta"].get("content") or ""
                if text and outcome.ttft is None:
                    outcome.ttft = time.monotonic() - started
                _record(outcome, choice, text)
            chunks += 1
            if job.leave_after is not None and chunks >= job.leave_after:
                outcome.left = True
                return  # leaving the block closes the connection mid-stream
    if not done and outcome.problem is None:
        outcome.problem = "the stream ended without [DONE]"


async def _whole(client: httpx.AsyncClient, job: Job, outcome: Outcome) -> None:
    try:
        response = await asyncio.wait_for(client.post("/v1/chat/completions", json=job.body),
                                          timeout=job.leave_after)
    except TimeoutError:
        outcome.left = True  # the request is cancelled: its connection closes
        return
    outcome.status = response.status_code
    reply = response.json()
    if response.status_code != 200:
        outcome.problem = f"HTTP {response.status_code}: {reply}"
        return
    choice = reply["choices"][0]
    _record(outcome, choice, choice["message"]["content"])
    if reply["usage"]["completion_tokens"] != len(outcome.tokens):
        outcome.problem = "usage does not count the tokens returned"


async def run_job(client: httpx.AsyncClient, job: Job) -> Outcome:
    outcome, started = Outcome(job.index, job.kind, job.stream), time.monotonic()
    try:
        await (_stream(client, job, outcome, started) if job.stream
               else _whole(client, job, outcome))
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        outcome.problem = f"{type(exc).__name__}: {exc}"
    if not outcome.left and outcome.problem is None:
        expected = job.body["max_tokens"]
        if outcome.finish_reason not in ("length", "stop") or len(outcome.tokens) != expected:
            outcome.problem = (f"finish_reason {outcome.finish_reason}, {len(outcome.tokens)} "
                               f"of {expected} tokens")
    return outcome


async def run_all(base_url: str, headers: dict, jobs: list[Job],
                  concurrency: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600,
                                 limits=limits) as client:
        async def one(job: Job) -> Outcome:
            async with gate:
                return await run_job(client, job)

        return await asyncio.gather(*(one(job) for job in jobs))


def same_path(got: Outcome, alone: Outcome) -> bool:
    """Token by token equal, logprobs within 1e-3; parting is allowed only at a near tie."""
    for (token, logprob, _), (alone_token, alone_logprob, gap) in zip(got.tokens, alone.tokens,
                                                                      strict=False):
        if token != alone_token:
            return gap < NEAR_TIE
        if abs(logprob - alone_logprob) > NEAR_TIE:
            return False
    return len(got.tokens) == len(alone.tokens)


def metric(base_url: str, name: str, headers: dict) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_idle(base_url: str, headers: dict, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(base_url, "steerserve_requests_running", headers) == 0 and \
                metric(base_url, "steerserve_requests_waiting", headers) == 0:
            return
        time.sleep(0.1)


def soak(base_url: str, headers: dict, pid: int, jobs: list[Job], concurrency: int) -> dict:
    """Warm up, soak, check; returns the report (its `failures` list is empty on success)."""
    warm = [Job(-1 - i, "plain", False, {**jobs[i % len(jobs)].body, "max_tokens": 4}, None)
            for i in range(concurrency)]
    asyncio.run(run_all(base_url, headers, warm, concurrency))
    wait_idle(base_url, headers)
    rss_before, errors_before = rss_bytes(pid), metric(
        base_url, 'steerserve_requests_finished_total{reason="error"}', headers)
    started = time.monotonic()
    outcomes = asyncio.run(run_all(base_url, headers, jobs, concurrency))
    elapsed = time.monotonic() - started
    wait_idle(base_url, headers)
    rss_after = rss_bytes(pid)
    failures = [f"job {o.index} ({o.kind}, {'stream' if o.stream else 'json'}): {o.problem}"
                for o in outcomes if o.problem and not o.left]
    errors = metric(base_url, 'steerserve_requests_finished_total{reason="error"}', headers) \
        - errors_before
    running = metric(base_url, "steerserve_requests_running", headers)
    if errors:
        failures.append(f"{errors:.0f} engine errors")
    if running:
        failures.append(f"{running:.0f} requests still hold slots")
    if httpx.get(f"{base_url}/health", timeout=30).status_code != 200:
        failures.append("/health is not 200")
    if rss_after > rss_before * 1.15 + 64 * 2**20:
        failures.append(f"RSS grew from {rss_before / 2**20:.0f} to {rss_after / 2**20:.0f} MiB")
    completed = [o for o in outcomes if not o.left and o.problem is None]
    by_job = {job.index: job for job in jobs}
    alone = asyncio.run(run_all(base_url, headers, [
        Job(o.index, o.kind, False, by_job[o.index].body, None) for o in completed], 1))
    for got, reference in zip(completed, alone, strict=True):
        if not same_path(got, reference):
            failures.append(f"job {got.index} ({got.kind}) differs from the same request alone")
    ttfts = sorted(o.ttft for o in outcomes if o.ttft is not None)
    return {"requests": len(jobs), "completed": len(completed),
            "left": sum(o.left for o in outcomes), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(jobs) / elapsed, 2),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
            "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1)
            if ttfts else None, "engine_errors": errors,
            "rss_before_mib": round(rss_before / 2**20), "rss_after_mib": round(rss_after / 2**20),
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens, at most")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_servers import ManagedServer, free_port
    from safetensors.torch import save_file

    repo = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="steerserve-soak-"))
    vector = work / "random.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({f"direction.{layer}": torch.randn(576, generator=generator) * 0.1
               for layer in range(8, 16)}, vector)
    port = free_port()
    command = [sys.executable, "-m", "steerserve.server.cli", "serve", "--port", str(port),
               "--dtype", "float32", "--max-num-seqs", str(args.concurrency), "--lora",
               f"uppercase={repo / 'examples' / 'adapters' / 'uppercase'}",
               "--steering-vector", f"random={vector}", "--vectors-dir", "none",
               "--log-level", "warning"]
    with ManagedServer("steerserve", command, port, work / "server.log", {}) as server:
        server.wait_healthy(600)
        names = Names("SmolLM2-135M-Instruct", "uppercase", "random")
        report = soak(server.base_url, {}, server.proc.pid,
                      make_jobs(args.requests, names, args.max_tokens), args.concurrency)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps({**report, "args": {k: str(v) for k, v in
                                                             vars(args).items()}}, indent=2))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
