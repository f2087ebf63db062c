"""Limits: every input that could make the server work or allocate in proportion to what a
request carries is bounded, refused past its bound with an error naming it; a full queue is a
429 that drains; a barrage of the largest bodies leaves memory bounded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.support import API_KEY, LiveServer

CHAT = "/v1/chat/completions"


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **fields}


def extraction(**fields) -> dict:
    return {"name": "v", "model": "tiny", "positive": ["a", "b"], "negative": ["c", "d"],
            **fields}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--max-num-seqs", "2", "--max-queue", "6",
                       "--max-n", "4", "--max-body-bytes", str(1 << 20),
                       "--allow-runtime-vectors"], api_key=API_KEY)
    yield live
    live.stop()


def post(server, path: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", **server.headers(),
                               **headers}, timeout=60)


BEYOND = [  # (path, body, status, param)
    (CHAT, chat(n=5), 400, "n"),
    (CHAT, chat(max_tokens=3000), 400, "max_tokens"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    (CHAT, chat(stop="x" * 257), 400, "stop"),
    (CHAT, chat(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias"),
    (CHAT, chat(stop_token_ids=list(range(1025))), 400, "stop_token_ids"),
    (CHAT, chat(steering=[{"values": [0.1] * 64, "layers": [0]}] * 9), 400, "steering"),
    (CHAT, chat(steering=[{"values": [0.1] * 65, "layers": [0]}]), 400, "steering.0.values"),
    (CHAT, chat(steering=[{"values": [0.1] * 64, "layers": list(range(1025))}]), 400,
     "steering.0.layers"),
    (CHAT, chat(messages=[{"role": "user", "content": "x" * (1 << 20)}]), 413, None),
    (CHAT, chat(messages=[{"role": "user", "content": "x"}] * 4097), 400, "messages"),
    ("/v1/steering/vectors", extraction(positive=["a"] * 1025, negative=["b"] * 1025), 400,
     "positive"),
    ("/v1/steering/vectors", extraction(positive=["a " * 3000, "b"]), 400, "positive"),
    ("/v1/steering/vectors", extraction(batch_size=65), 400, "batch_size"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BEYOND,
                         ids=[f"{status}-{param}-{i}" for i, (_, _, status, param)
                              in enumerate(BEYOND)])
def test_beyond_each_bound(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert param is None or (response.json()["error"]["param"] or "").startswith(param)


def test_headers_beyond_the_bound(server):
    try:
        response = post(server, CHAT, chat(), **{"x-padding": "y" * 100_000})
    except httpx.TransportError:
        return  # h11 dropped the connection: refused too
    assert 400 <= response.status_code < 500


def test_a_full_queue_is_429_and_drains(server):
    """2 slots, 6 waiting: of 20 at once, some are refused at once and every other one
    completes; then the server takes requests again."""
    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(),
                                     timeout=120) as client:
            body = chat(max_tokens=200, ignore_eos=True)
            replies = await asyncio.gather(*(client.post(CHAT, json=body) for _ in range(20)))
            return [reply.status_code for reply in replies]

    statuses = asyncio.run(flood())
    assert set(statuses) == {200, 429} and statuses.count(429) >= 12 - 8, statuses
    assert post(server, CHAT, chat()).status_code == 200
    assert server.metric("steerserve_requests_waiting") == 0


def high_water_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_largest_bodies_leave_memory_bounded(server):
    """Thirty 1 MiB bodies of numbers at once (each becomes ~16 MiB of Python objects while
    it is parsed): parsing runs one body at a time, and nothing of a refused body stays."""
    before = high_water_mib(server.process.pid)
    values = [0.5] * ((1 << 20) // 5)  # "0.5, " per value: just under the 1 MiB body bound
    body = chat(steering=[{"values": values, "layers": [0]}])

    async def barrage() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(),
                                     timeout=120) as client:
            replies = await asyncio.gather(*(client.post(CHAT, json=body) for _ in range(30)))
            return [reply.status_code for reply in replies]

    assert set(asyncio.run(barrage())) == {400}  # a width the model does not have
    assert high_water_mib(server.process.pid) - before < 200


def test_extraction_batches_keep_within_the_prefill_budget():
    from steerserve.server.routes.vectors import batches

    prompts = [[1] * n for n in (100, 100, 100, 3000, 50, 50, 5000, 10)]
    found = batches(prompts, most=8, budget=1024)
    assert [len(batch) for batch in found] == [3, 1, 2, 1, 1]  # in order, none split
    assert all(len(b) == 1 or max(map(len, b)) * len(b) <= 1024 for b in found)
    assert [p for batch in found for p in batch] == prompts
    assert [len(b) for b in batches([[1]] * 20, most=8, budget=1024)] == [8, 8, 4]
