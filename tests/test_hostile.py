"""Hostile input, and web pages as attackers: every odd but valid body is a 4xx naming its
field (never a 500), bounds are checked before work, and a page on another origin can neither
post preflight-free bodies nor reach a loopback server through DNS rebinding."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.tiny_models import tiny_llama

CHAT = "/v1/chat/completions"
ADMIN_KEY, API_KEY = "admin-secret", "user-secret"


def chat(**fields) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, **fields}


@pytest.fixture(scope="module")
def server(llama):
    settings = ServerSettings(vectors_dir=None, allow_request_chat_template=True,
                              allowed_origins=("http://app.example",), api_key=API_KEY,
                              admin_key=ADMIN_KEY)
    live = InProcessServer(build_context(settings, llama))
    yield live
    live.stop()


def send(server, body: bytes | dict, path: str = CHAT, key: str = API_KEY,
         headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    merged = {"content-type": "application/json", "authorization": f"Bearer {key}",
              **(headers or {})}
    return httpx.post(f"{server.base_url}{path}", content=content, headers=merged,
                      timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("body", "param"), [
    (chat(logit_bias={"²": 1}), "logit_bias"),  # isdigit() says yes, int() raises
    (chat(logit_bias={"١٢": 1}), "logit_bias"),  # Arabic-Indic digits
    (chat(logit_bias={"1": 1, "01": 2}), "logit_bias"),  # one token id, twice
    (chat(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    (chat(stop_token_ids=list(range(1025))), "stop_token_ids"),
    (chat(steering=[{"values": [0.1] * 64, "layers": {"start": 0, "end": 10**12}}]),
     "steering.0.layers"),
    (chat(steering=[{"values": [0.1] * 64, "layers": [0], "scale": 1e300}]), "steering.0.scale"),
    (chat(steering=[{"values": [1e300] * 64, "layers": [0]}]), "steering.0.values.0"),
    (chat(messages=[{"role": "user", "content": "x"}] * 5000), "messages"),
    (chat(chat_template="{{ raise_exception('no') }}"), "chat_template"),
    (chat(chat_template="{% for %}"), "chat_template"),
])
def test_odd_bodies_are_400s_naming_the_field(server, body, param):
    assert_error(send(server, body, timeout=10), 400, param)  # bounds before work: quick


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": '
     b'"a\\ud800b"}]}', "messages.0.content"),
    (b'{"model": "tiny-llama", "messages": [], "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     None),
    (b'{"model": "tiny-llama", "messages": [], "stop": ' + b"[" * 40 + b"]" * 40 + b"}", "stop"),
])
def test_valid_json_that_no_model_can_take_is_400(server, raw, param):
    error = assert_error(send(server, raw), 400)
    assert param is None or error["param"].startswith(param), error


def test_the_request_chat_template_is_the_one_used(server, tokenizer):
    reply = send(server, chat(chat_template="{{ 'Hello world' }}")).json()
    assert reply["usage"]["prompt_tokens"] == len(tokenizer("Hello world")["input_ids"])


def test_a_model_that_produces_nan_still_answers_json(tokenizer):
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")  # every softmax is NaN
    loaded = from_pretrained_objects(model, tokenizer, "broken")
    live = InProcessServer(build_context(ServerSettings(vectors_dir=None), loaded))
    try:
        reply = live.post("/v1/completions", {"model": "broken", "prompt": "Hello",
                                              "max_tokens": 3, "logprobs": 2, "echo": True})
        assert reply.status_code == 200, reply.text
        logprobs = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs[0] is None and all(lp == -9999.0 for lp in logprobs[1:])
    finally:
        live.stop()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", ""])
def test_bodies_must_say_they_are_json(server, content_type):
    """A page may POST these cross-origin without a preflight: none is read."""
    assert_error(send(server, chat(), headers={"content-type": content_type}), 415)
    ok = send(server, chat(), headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_dns_rebinding_is_refused_on_loopback(server):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        error = assert_error(send(server, chat(), headers={"host": host}), 400)
        assert error["code"] == "invalid_host"
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert send(server, chat(), headers={"host": host}).status_code == 200


def test_cors_only_for_the_allowed_origin(server):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{server.base_url}{CHAT}", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})

    allowed = preflight("http://app.example")
    assert allowed.headers.get("access-control-allow-origin") == "http://app.example"
    other = preflight("http://evil.example")
    assert "access-control-allow-origin" not in other.headers


def test_vector_writes_are_admin_and_off_by_default(server):
    body = {"name": "v", "model": "tiny-llama", "positive": ["good", "fine"],
            "negative": ["bad", "poor"], "method": "mean_diff"}
    assert_error(send(server, body, "/v1/steering/vectors"), 403)
    response = httpx.delete(f"{server.base_url}/v1/steering/vectors/v",
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert_error(response, 403)


def test_admin_routes_want_the_admin_key(llama):
    settings = ServerSettings(vectors_dir=None, allow_runtime_vectors=True, api_key=API_KEY,
                              admin_key=ADMIN_KEY)
    live = InProcessServer(build_context(settings, llama))
    try:
        body = {"name": "v", "model": "tiny-llama", "positive": ["good", "fine"],
                "negative": ["bad", "poor"], "method": "mean_diff"}
        error = assert_error(send(live, body, "/v1/steering/vectors"), 401)
        assert error["code"] == "invalid_admin_key"
        assert send(live, body, "/v1/steering/vectors", key=ADMIN_KEY).status_code == 200
        listed = httpx.get(f"{live.base_url}/v1/steering/vectors",
                           headers={"authorization": f"Bearer {API_KEY}"})
        assert [v["id"] for v in listed.json()["data"]] == ["v"]  # reads need the API key only
    finally:
        live.stop()
