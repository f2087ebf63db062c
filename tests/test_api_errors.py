"""Bad input gets a 4xx OpenAI error naming the field; the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from steerserve.server.app import build_context, create_app
from steerserve.server.settings import ServerSettings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4, **fields}


BAD_BODIES = [
    # (path, raw body, expected status, expected param or None)
    (CHAT, b'"just a string"', 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b"42", 400, None),
    (CHAT, b"null", 400, None),
    (CHAT, b'{"model": "tiny", "messages": [', 400, None),
    (CHAT, b'{"model": "tiny", "messages": "\xff\xfe"}', 400, None),
]

BAD_FIELDS = [
    (CHAT, {"model": "tiny", "max_tokens": 4}, "messages"),
    (CHAT, chat(messages=[]), "messages"),
    (CHAT, chat(messages="hello"), "messages"),
    (CHAT, chat(messages=[{"content": "x"}]), "messages.0.role"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    (CHAT, chat(messages=[{"role": "user", "content": 12}]), "messages.0.content"),
    (CHAT, chat(temperature=-0.5), "temperature"),
    (CHAT, chat(temperature=2.5), "temperature"),
    (CHAT, chat(top_p=0), "top_p"),
    (CHAT, chat(top_p=1.5), "top_p"),
    (CHAT, chat(top_k=-2), "top_k"),
    (CHAT, chat(min_p=1.5), "min_p"),
    (CHAT, chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_tokens=-3), "max_tokens"),
    (CHAT, chat(max_tokens=10**7), "max_tokens"),
    (CHAT, chat(n=0), "n"),
    (CHAT, chat(n=1000), "n"),
    (CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (CHAT, chat(top_logprobs=2), "top_logprobs"),
    (CHAT, chat(seed=2**63), "seed"),
    (CHAT, chat(stop=[""]), "stop"),
    (CHAT, chat(stop=[f"s{i}" for i in range(40)]), "stop"),
    (CHAT, chat(logit_bias={"999999": 1}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": "abc"}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": 500}), "logit_bias"),
    (CHAT, chat(temprature=0.5), "temprature"),
    (CHAT, chat(chat_template="{{ 7 * 7 }}"), "chat_template"),
    (CHAT, chat(stream_options={"include_usage": True}), "stream_options"),
    (CHAT, chat(presence_penalty=3), "presence_penalty"),
    (CHAT, chat(repetition_penalty=0), "repetition_penalty"),
    (CHAT, chat(tools=[{"type": "function"}]), "tools"),
    (COMPLETIONS, completion(prompt=[1] * 5000), "prompt"),
    (COMPLETIONS, completion(prompt=[10**6]), "prompt"),
    (COMPLETIONS, completion(prompt=""), "prompt"),
    (COMPLETIONS, completion(max_tokens=0), "max_tokens"),
    (COMPLETIONS, completion(logprobs=21), "logprobs"),
    (COMPLETIONS, completion(suffix="x"), "suffix"),
]


def post(server, path: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    merged = {"content-type": "application/json", **server.headers(), **(headers or {})}
    return httpx.post(f"{server.base_url}{path}", content=content, headers=merged, timeout=30)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize(("path", "raw", "status", "param"), BAD_BODIES)
def test_malformed_bodies(tiny_server, path, raw, status, param):
    assert_openai_error(post(tiny_server, path, raw), status, param)


@pytest.mark.parametrize(("path", "body", "param"), BAD_FIELDS,
                         ids=[f"{p.split('/')[-1]}-{param}-{i}"
                              for i, (p, _, param) in enumerate(BAD_FIELDS)])
def test_bad_fields_name_the_param(tiny_server, path, body, param):
    assert_openai_error(post(tiny_server, path, json.dumps(body).encode()), 400, param)


def test_nan_temperature(tiny_server):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    assert_openai_error(post(tiny_server, CHAT, raw), 400, "temperature")


def test_unknown_model_is_404(tiny_server):
    response = post(tiny_server, CHAT, json.dumps(chat(model="gpt-9")).encode())
    assert_openai_error(response, 404, "model")


def test_oversized_body_is_413(tiny_server):
    huge = json.dumps(chat(messages=[{"role": "user", "content": "x" * (5 * 2**20)}]))
    assert_openai_error(post(tiny_server, CHAT, huge.encode()), 413, None)


def test_huge_header_is_refused(tiny_server):
    """uvicorn bounds headers (64 KiB here): it answers 4xx or drops the connection."""
    try:
        response = post(tiny_server, CHAT, json.dumps(chat()).encode(),
                        headers={"x-padding": "y" * 200_000})
    except (httpx.ReadError, httpx.RemoteProtocolError):
        response = None
    assert response is None or 400 <= response.status_code < 500
    assert httpx.get(f"{tiny_server.base_url}/health", timeout=5).status_code == 200


def test_unknown_route_is_openai_404(tiny_server):
    response = httpx.get(f"{tiny_server.base_url}/v1/nothing", timeout=10)
    assert_openai_error(response, 404, None)


def test_still_serving_after_bad_input(tiny_server):
    assert httpx.get(f"{tiny_server.base_url}/health", timeout=5).status_code == 200
    ok = post(tiny_server, CHAT, json.dumps(chat()).encode())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_full_queue_is_429(llama):
    """The engine thread is not started, so the first two requests stay queued."""
    ctx = build_context(ServerSettings(max_queue=2, max_num_seqs=2, vectors_dir=None), llama)
    body = {"model": llama.name, "messages": MESSAGES, "max_tokens": 2}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            queued = [asyncio.create_task(client.post(CHAT, json=body)) for _ in range(2)]
            while ctx.engine.num_waiting < 2:
                await asyncio.sleep(0.01)
            response = await client.post(CHAT, json=body)
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
            return response

    response = asyncio.run(call())
    assert_openai_error(response, 429, None)


def test_a_wrong_method_is_a_405_that_says_which_are_allowed(tiny_server):
    reply = httpx.get(f"{tiny_server.base_url}{CHAT}", headers=tiny_server.headers(),
                      timeout=30)
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json()["error"]["type"] == "invalid_request_error"
